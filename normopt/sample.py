"""``normopt sample RUN_DIR --prompt TEXT``: text from a trained run, on the CPU.

The weights come from the run's export of that step when there is one (``normopt export``
writes ``export/step_N.safetensors`` with its config and tokenizer beside it), else straight
from the checkpoint through the exporter's reader (tensors only; nothing is unpickled). The
model is the plain single-process Transformer; generation is a simple loop that re-runs the
model over the last ``train.seq_len`` tokens at every step (no KV cache: meant for the small
models this framework trains, to see what a run has learned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from normopt.cli_args import CommandParser
from normopt.config import Config, read_saved_config
from normopt.errors import UserError
from normopt.export import load_model_weights, run_tokenizer
from normopt.plugins import check_run_plugins
from normopt.run_dir import RunDir


@dataclass
class LoadedRun:
    model: torch.nn.Module
    tokenizer: object  # tokenizers.Tokenizer
    cfg: Config
    step: int
    source: Path  # the export file or checkpoint folder the weights came from


def load_run(run_dir: Path, step: int | None = None, doing: str = "sample") -> LoadedRun:
    """The run's model at ``step`` (default: latest complete checkpoint) in eval mode on the
    CPU, with the config and tokenizer it was trained with (and the plugins it records loaded
    unchanged; ``doing`` names the command in the refusal)."""
    from safetensors.torch import load_file

    from normopt.data.tokenizer import load_tokenizer
    from normopt.models.llama import build_model
    from normopt.models.presets import resolve_model_args

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    check_run_plugins(run.path, doing)
    checkpoint = run.find_checkpoint(step, "--step")
    exported = run.export_files(run.export / f"{checkpoint.name}.safetensors")
    if all(path.is_file() for path in exported.values()):
        source = exported["weights"]
        try:
            weights = load_file(str(source))
        except Exception as exc:  # safetensors' own error types: a garbage or truncated file
            raise UserError(
                f"{source}: not a readable safetensors file "
                f"({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]})"
            ) from None
        config, tokenizer_path = exported["config"], exported["tokenizer"]
    else:
        config = run.config_of(checkpoint)
        tokenizer_path = run_tokenizer(run, config)
        source, weights = checkpoint, load_model_weights(checkpoint)
    cfg = read_saved_config(config)
    embedding = weights.get("tok_embeddings.weight")
    if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2:
        names = ", ".join(sorted(weights)[:3]) or "none"
        raise UserError(
            f"{source}: no 2-D tok_embeddings.weight, so these are not the weights of a normopt "
            f"model (its tensors: {names}{' ...' if len(weights) > 3 else ''})"
        )
    vocab = embedding.shape[0]
    model = build_model(resolve_model_args(cfg.model, vocab), "cpu")  # non-persistent buffers initialised
    built = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing, extra = sorted(built.keys() - weights.keys()), sorted(weights.keys() - built.keys())
    shapes = sorted(n for n in built.keys() & weights.keys() if tuple(weights[n].shape) != built[n])
    if missing or extra or shapes:
        parts = [
            f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("lack", missing), ("have extra", extra), ("have other shapes for", shapes))
            if names
        ]
        raise UserError(f"{source}: the weights do not fit the run's config: they {'; '.join(parts)}")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise UserError(
            f"{source}: the weights do not fit the run's config ({' '.join(str(exc).split())[:300]})"
        ) from None
    model.eval()
    return LoadedRun(model, load_tokenizer(tokenizer_path), cfg, int(checkpoint.name.split("_")[1]), source)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    context: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Append up to ``max_new_tokens`` tokens to ``prompt_ids`` (returned without the prompt),
    each drawn from the model's next-token distribution over the last ``context`` tokens:
    greedy at temperature 0, else softmax(logits / T) restricted to the ``top_k`` most likely.
    Stops early after ``stop_id`` (the end-of-document token)."""
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-context:]], dtype=torch.long)
        logits = model(window)[0, -1].float()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                threshold = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        ids.append(token)
        new.append(token)
        if token == stop_id:
            break
    return new


MAX_NEW_TOKENS = 1_000_000


def sample_main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="normopt sample",
        description="Generate text from a run's checkpoint (or its export) on the CPU and print it.",
    )
    parser.add_argument("run_dir", help="the run directory")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest complete)")
    args = parser.parse_args(argv)
    if not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens must be in [0, {MAX_NEW_TOKENS}], got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and 0 <= args.temperature <= 1e4):
        raise UserError(f"--temperature must be a number in [0, 10000], got {args.temperature}")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    from normopt.data.tokenizer import EOS_CANDIDATES

    loaded = load_run(Path(args.run_dir), args.step)
    prompt_ids = loaded.tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise UserError("--prompt: the prompt encodes to no tokens")
    stop = next((i for name in EOS_CANDIDATES if (i := loaded.tokenizer.token_to_id(name)) is not None), None)
    new = generate(
        loaded.model,
        prompt_ids,
        args.max_new_tokens,
        loaded.cfg.train.seq_len,
        args.temperature,
        args.top_k,
        args.seed,
        stop,
    )
    print(args.prompt + loaded.tokenizer.decode(new))
    return 0
