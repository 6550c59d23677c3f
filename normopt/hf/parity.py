"""The parity gate of an export: the folder, loaded by transformers in float32, gives the
logits of normopt's own forward on a fixed batch, and its tokenizer the same ids.

With p the softmax of normopt's logits and q that of the export's, both per position:

    max_abs = max |logits_normopt - logits_export|      <= MAX_ABS_LOGIT_DIFF * max(1, max |logits_normopt|)
    kl      = mean over positions of KL(p || q)         <= MAX_KL (nats)

Both models run float32 operations of the same order, so the differences are float32
rounding (at most 2.4e-6 on the test models, logits up to ~5), far inside the bounds; a
wrong name, layout or scale moves the logits by orders of magnitude more (a swapped pair of
matrices: ~6e-2; a 1% wrong norm gain: ~4e-3).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from normopt.errors import UserError

MAX_ABS_LOGIT_DIFF = 1e-4  # relative to the largest |logit| (at least 1)
MAX_KL = 1e-6  # nats per position
GATE_BATCH = 2
GATE_TOKENS = 16
GATE_SEED = 0
GATE_TEXT = "The export loads in transformers: 12 + 30 = 42."


@dataclass(frozen=True)
class Parity:
    max_abs: float
    kl: float
    scale: float  # max(1, max |reference logit|)

    @property
    def ok(self) -> bool:
        return self.max_abs <= MAX_ABS_LOGIT_DIFF * self.scale and self.kl <= MAX_KL

    def describe(self) -> str:
        return (
            f"max |logit difference| {self.max_abs:.3g} (bound {MAX_ABS_LOGIT_DIFF * self.scale:.3g}), "
            f"mean KL {self.kl:.3g} nats (bound {MAX_KL:g})"
        )


def compare_logits(reference: torch.Tensor, logits: torch.Tensor) -> Parity:
    """:class:`Parity` of ``logits`` against ``reference`` (same shape, (..., vocab)), in float64."""
    reference, logits = reference.detach().double(), logits.detach().double()
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return Parity(float((reference - logits).abs().max()), float(kl), max(1.0, float(reference.abs().max())))


def gate_tokens(vocab_size: int, max_positions: int) -> torch.Tensor:
    """The fixed batch: GATE_BATCH sequences of up to GATE_TOKENS uniform token ids."""
    generator = torch.Generator().manual_seed(GATE_SEED)
    return torch.randint(vocab_size, (GATE_BATCH, min(GATE_TOKENS, max_positions)), generator=generator)


@contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off (a gate that passes prints nothing)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_exported(folder: Path, remote_code: bool):
    """The exported causal LM in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote_code, dtype=torch.float32).eval()


@torch.no_grad()
def measure_parity(model: torch.nn.Module, exported, tokens: torch.Tensor) -> Parity:
    """Parity of the exported model's logits against normopt's ``model`` on ``tokens``."""
    return compare_logits(model(tokens).float(), exported(tokens).logits.float())


def parity_gate(model: torch.nn.Module, tokenizer, folder: Path, remote_code: bool) -> Parity:
    """Load ``folder`` with transformers and refuse it (UserError) unless its logits pass the
    bounds above against normopt's ``model`` and its tokenizer encodes GATE_TEXT as ``tokenizer`` does."""
    from transformers import AutoTokenizer

    try:
        exported = load_exported(folder, remote_code)
        with quiet_transformers():
            exported_tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote_code)
            exported_ids = exported_tokenizer(GATE_TEXT)["input_ids"]
    except Exception as exc:  # any failure to load is a failed gate
        raise UserError(
            f"the export does not load in transformers ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); nothing was written"
        ) from None
    tokens = gate_tokens(model.args.vocab_size, exported.config.max_position_embeddings)
    parity = measure_parity(model, exported, tokens)
    if not parity.ok:
        raise UserError(
            f"the export failed its parity gate against normopt's forward: {parity.describe()}; nothing was written"
        )
    if exported_ids != tokenizer.encode(GATE_TEXT).ids:
        raise UserError("the exported tokenizer encodes text differently from the run's; nothing was written")
    return parity
