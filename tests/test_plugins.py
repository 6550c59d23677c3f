"""Plugins: loading and registering (normopt/plugins.py, normopt/registry.py), the keys a
component declares, the run directory's record, and the published rules of the three
example plugins (examples/plugins/)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from normopt.config import keys_with_role, load_config
from normopt.errors import UserError
from normopt.key_roles import EXECUTION, MATH
from normopt.models.norm_layer import NormConfig, NormLayer
from normopt.models.norms import NORMS
from normopt.optim.registry import OPTIMIZERS
from normopt.plugins import check_run_plugins, forget_all, load_plugins, loaded_plugins, write_run_plugins
from tests.conftest import REPO_ROOT, run_cli, tiny_run_args
from tests.processes import child_env

EXAMPLES = REPO_ROOT / "examples" / "plugins"
SCALENORM, ADEMAMIX, UPDATE_RMS = (str(EXAMPLES / f"{name}.py") for name in ("scalenorm", "ademamix", "update_rms"))
ALL = (SCALENORM, ADEMAMIX, UPDATE_RMS)


@pytest.fixture
def examples():
    """The three example plugins loaded in this process; the tables put back afterwards."""
    yield load_plugins(ALL)
    forget_all()


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "normopt.cli", *map(str, args)],
        cwd=REPO_ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _one_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    return lines[0]


# --------------------------------------------------------------------------- loading


def test_a_plugin_joins_the_registries_and_leaves_them(examples):
    assert [p.name for p in examples] == ["scalenorm", "ademamix", "update_rms"]
    assert "scalenorm" in NORMS and NORMS.owner("scalenorm") == "scalenorm"
    assert NORMS.owner("rmsnorm") == "normopt"  # built-ins stay credited to normopt
    assert examples[0].components == ("norm:scalenorm",)
    assert issubclass(NORMS["scalenorm"], NormLayer)  # the torch-only class, made a NormLayer
    assert OPTIMIZERS["ademamix"].state_bytes == 12
    assert all(len(p.sha256) == 64 for p in examples)
    assert load_plugins([SCALENORM])[0] is examples[0]  # loading again is a no-op
    forget_all()
    assert "scalenorm" not in NORMS and "ademamix" not in OPTIMIZERS and not loaded_plugins()


def test_refusals_are_one_line_and_leave_the_tables_whole(tmp_path):
    dup = tmp_path / "dup.py"
    dup.write_text(
        "from normopt.extend import NORMS\nfrom normopt.models.rmsnorm import RMSNorm\nNORMS.register(RMSNorm)\n"
    )
    broken = tmp_path / "broken.py"
    broken.write_text("from normopt.extend import OPTIMIZERS\nraise RuntimeError('no GPU here\\nsecond line')\n")
    before = tuple(NORMS)
    with pytest.raises(UserError, match=r"norm 'rmsnorm' is registered twice \(by normopt and by dup\)"):
        load_plugins([dup])
    with pytest.raises(UserError, match=r"plugin broken .* failed to load: RuntimeError: no GPU here$"):
        load_plugins([broken])
    with pytest.raises(UserError, match="no such file"):
        load_plugins([tmp_path / "missing.py"])
    with pytest.raises(UserError, match="no importable module of that name"):
        load_plugins(["no_such_module_anywhere"])
    assert tuple(NORMS) == before and not loaded_plugins()


def test_the_config_names_plugins_relative_to_itself(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("plugins: [examples/plugins/scalenorm.py]\nmodel: {norm: scalenorm}\n")
    with pytest.raises(UserError, match="no such file"):  # relative to the file, not the working directory
        load_config(config)
    config.write_text(f"plugins: [{SCALENORM}]\nmodel: {{norm: scalenorm}}\n")
    try:
        assert load_config(config).model.norm == "scalenorm"
    finally:
        forget_all()
    with pytest.raises(UserError, match=r"model.norm: 'scalenorm' is not one of .* name its plugin"):
        load_config(None, ["model.norm=scalenorm"])


def test_a_component_declares_its_own_keys(examples):
    cfg = load_config(None, ["optim.name=ademamix", "optim.ademamix_alpha=8", "diagnostics.update_rms_interval=5"])
    assert cfg.optim.ademamix_alpha == 8.0 and cfg.optim.ademamix_beta3 == 0.9999
    assert cfg.diagnostics.update_rms_interval == 5
    assert "optim.ademamix_alpha" in keys_with_role(MATH)
    assert "diagnostics.update_rms_interval" in keys_with_role(EXECUTION)  # may change on resume
    with pytest.raises(UserError, match="optim.ademamix_alpha: must be >= 0"):
        load_config(None, ["optim.ademamix_alpha=-1"])
    with pytest.raises(UserError, match="optim.ademamix_beta3: expected a number"):
        load_config(None, ["optim.ademamix_beta3=fast"])
    forget_all()
    with pytest.raises(UserError, match="optim.ademamix_alpha: unknown config key"):
        load_config(None, ["optim.ademamix_alpha=8"])


def test_config_reference_and_show_list_a_plugins_keys():
    proc = _cli("config", "--reference", "--plugin", ADEMAMIX)
    assert proc.returncode == 0, proc.stderr
    assert "| `optim.ademamix_alpha` | float | `5.0` | math | AdEMAMix: weight of the slow EMA" in proc.stdout
    assert "ademamix" not in _cli("config", "--reference").stdout


def test_installed_entry_points_load_unless_switched_off(tmp_path):
    site = tmp_path / "site"
    (site / "my_norms").mkdir(parents=True)
    (site / "my_norms" / "__init__.py").write_text((EXAMPLES / "scalenorm.py").read_text())
    info = site / "my_norms-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-norms\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[normopt.plugins]\nmy_norms = my_norms\n")
    code = (
        "from normopt.plugins import load_plugins, loaded_plugins; "
        "load_plugins([]); print([p.name for p in loaded_plugins()])"
    )
    env = {"PYTHONPATH": f"{site}:{REPO_ROOT}"}
    found = subprocess.run([sys.executable, "-c", code], env=child_env(env), capture_output=True, text=True)
    assert found.stdout.strip() == "['my_norms']", found.stderr
    off = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env({**env, "NORMOPT_DISABLE_PLUGIN_AUTOLOAD": "1"}),
        capture_output=True,
        text=True,
    )
    assert off.stdout.strip() == "[]", off.stderr


# --------------------------------------------------------------------------- the run's record


def test_the_run_records_its_plugins_and_refuses_a_changed_one(tmp_path, examples):
    write_run_plugins(tmp_path)
    record = json.loads((tmp_path / "plugins.json").read_text())["plugins"]
    assert [(p["name"], p["components"]) for p in record] == [
        ("scalenorm", ["norm:scalenorm"]),
        ("ademamix", ["optimizer:ademamix"]),
        ("update_rms", ["diagnostic:update_rms"]),
    ]
    check_run_plugins(tmp_path, "resume")  # the same plugins: fine
    forget_all()
    with pytest.raises(UserError, match=r"trained with plugin scalenorm .* name it to report this run \(--plugin "):
        check_run_plugins(tmp_path, "report")
    changed = tmp_path / "copy" / "scalenorm.py"
    changed.parent.mkdir()
    changed.write_text((EXAMPLES / "scalenorm.py").read_text().replace("1e-5", "1e-6"))
    load_plugins([changed, ADEMAMIX, UPDATE_RMS])
    with pytest.raises(UserError, match=r"plugin scalenorm changed since .* is changed math"):
        check_run_plugins(tmp_path, "export")


def test_nothing_a_run_directory_names_is_imported(tmp_path, tiny_corpus):
    """A plugin record on disk is data: report, sample, export and resume refuse the run,
    and the file it names never runs."""
    marker = tmp_path / "imported"
    trap = tmp_path / "trap.py"
    trap.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, "checkpoint.interval=3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = {"plugins": [{"name": "trap", "source": str(trap), "sha256": "0" * 64, "components": ["norm:trap"]}]}
    (run_dir / "plugins.json").write_text(json.dumps(record))
    for command in (["sample", run_dir, "--prompt", "to be"], ["export", run_dir], ["report", tmp_path]):
        line = _one_line(_cli(*command))
        assert "trained with plugin trap" in line and f"--plugin {trap}" in line, line
    line = _one_line(run_cli(tiny_run_args(run_dir, tiny_corpus, "train.steps=9")))
    assert "name it to resume this run" in line
    assert not marker.exists()


# --------------------------------------------------------------------------- ScaleNorm


def test_scalenorm_is_a_scalar_gain_over_the_unit_sphere(examples):
    """Nguyen & Salazar 2019: y = g x / ||x||, one scalar g initialised to sqrt(d); at init,
    RMSNorm with unit gain; every output has norm g; the input's scale is discarded."""
    d = 32
    layer = NORMS["scalenorm"].from_config(d, NormConfig("scalenorm", eps=1e-5), "attn")
    assert [p.numel() for p in layer.parameters()] == [1] == [NORMS["scalenorm"].param_count(d, None)]
    assert layer.weight.item() == pytest.approx(math.sqrt(d))
    x = torch.randn(4, 7, d, dtype=torch.float64).float()
    y = layer(x)
    rms_unit_gain = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(y, rms_unit_gain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.norm(dim=-1), torch.full((4, 7), math.sqrt(d)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(3.7 * x), y, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    torch.testing.assert_close(layer(x).norm(dim=-1), torch.full((4, 7), 2.0), rtol=1e-5, atol=1e-5)
    layer.reset_parameters()
    assert layer.weight.item() == pytest.approx(math.sqrt(d))


# --------------------------------------------------------------------------- AdEMAMix


def _ademamix_module(examples):
    return sys.modules["normopt_plugin_ademamix"]


def test_ademamix_with_alpha_zero_is_adamw(examples):
    """Pagliardini et al. 2024, section 3: alpha = 0 leaves Adam(W)."""
    ademamix = _ademamix_module(examples)
    torch.manual_seed(0)
    start = torch.randn(5, 3)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    mine = ademamix.AdEMAMix([a], lr=0.01, betas=(0.9, 0.95, 0.9999), alpha=0.0, eps=1e-8, weight_decay=0.1)
    reference = torch.optim.AdamW([b], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(20):
        grad = torch.randn(5, 3)
        a.grad, b.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(a, start)


def test_ademamix_two_steps_by_algorithm_1(examples):
    ademamix = _ademamix_module(examples)
    beta1, beta2, beta3, alpha, lr, eps, wd = 0.9, 0.999, 0.99, 5.0, 0.1, 1e-8, 0.01
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = ademamix.AdEMAMix([theta], lr=lr, betas=(beta1, beta2, beta3), alpha=alpha, eps=eps, weight_decay=wd)
    expected, m1, m2, nu = theta.detach().clone(), 0.0, 0.0, 0.0
    for t, g in enumerate((torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 0.25])), start=1):
        g = g.double()
        theta.grad = g.clone()
        optimizer.step()
        m1 = beta1 * m1 + (1 - beta1) * g
        m2 = beta3 * m2 + (1 - beta3) * g
        nu = beta2 * nu + (1 - beta2) * g * g
        step = (m1 / (1 - beta1**t) + alpha * m2) / ((nu / (1 - beta2**t)).sqrt() + eps)
        expected = expected - lr * (step + wd * expected)
        torch.testing.assert_close(theta.detach(), expected, rtol=1e-12, atol=1e-12)


def test_ademamix_schedulers(examples):
    ademamix = _ademamix_module(examples)
    assert [ademamix.alpha_at(t, 8.0, 100) for t in (0, 50, 100, 1000)] == [0.0, 4.0, 8.0, 8.0]
    assert ademamix.alpha_at(3, 8.0, 0) == 8.0
    betas = [ademamix.beta3_at(t, 0.9, 0.9999, 100) for t in range(0, 201, 10)]
    assert betas[0] == pytest.approx(0.9) and betas[10] == pytest.approx(0.9999) and betas[-1] == 0.9999
    assert all(x <= y for x, y in zip(betas, betas[1:]))
    # the scheduler is linear in the half-life 1 / -ln(beta3): halfway it is the mean of the two
    halfway = -1 / math.log(ademamix.beta3_at(50, 0.9, 0.9999, 100))
    assert halfway == pytest.approx((-1 / math.log(0.9) - 1 / math.log(0.9999)) / 2)


# --------------------------------------------------------------------------- update RMS


def test_update_rms_is_recomputed_from_two_checkpoints(tmp_path, tiny_corpus):
    """rms(W_2 - W_1) / rms(W_1) of every block matrix from the checkpoints of steps 1 and 2
    is the ratio the diagnostic logged at step 2."""
    from normopt.export import load_model_weights
    from normopt.run_dir import RunDir

    run_dir = tmp_path / "run"
    plugin_args = [f"--plugin={UPDATE_RMS}"]
    extra = ["optim.name=muon", "checkpoint.interval=1", "checkpoint.keep_latest_k=3", "train.steps=3"]
    proc = run_cli([*plugin_args, *tiny_run_args(run_dir, tiny_corpus, *extra, "diagnostics.interval=0")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if r["kind"] == "update_rms"}
    assert sorted(logged) == [1, 2, 3]  # every step, with every built-in diagnostic off
    run = RunDir(run_dir)
    w1, w2 = load_model_weights(run.checkpoint(1)), load_model_weights(run.checkpoint(2))
    ratios = logged[2]["matrices"]
    assert ratios and set(ratios) == {n for n in w1 if n.startswith("layers.") and w1[n].ndim == 2}
    for name, ratio in ratios.items():
        before, after = w1[name].double(), w2[name].double()
        expected = (after - before).pow(2).mean().sqrt() / before.pow(2).mean().sqrt()
        assert ratio == pytest.approx(float(expected), rel=1e-9), name
    assert logged[2]["groups"]["attn.wq"] == pytest.approx(
        sum(v for n, v in ratios.items() if ".attn.wq." in n) / 2, rel=1e-12
    )


def test_a_plugin_module_can_stay_torch_only():
    source = (EXAMPLES / "scalenorm.py").read_text()
    assert "normopt" not in "".join(line for line in source.splitlines() if line.startswith(("import", "from")))
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("scalenorm", {str(EXAMPLES / "scalenorm.py")!r})
        module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
        print(module.ScaleNorm(4)(__import__("torch").ones(1, 4)).tolist(), "normopt" in sys.modules)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env())
    assert proc.stdout.strip() == "[[1.0, 1.0, 1.0, 1.0]] False", proc.stderr


def test_a_specs_plugins_reach_every_job_of_a_slurm_grid(tmp_path):
    """The array tasks (the sbatch script, its config check and its launcher) and the report
    job name the spec's plugins: the generated scripts carry them, as the command line would."""
    import yaml

    spec = yaml.safe_load((REPO_ROOT / "configs" / "factorial" / "plugins_cpu.yaml").read_text())
    spec.update(base=str(REPO_ROOT / "configs" / "demo.yaml"), root=str(tmp_path / "grid"), plugins=list(ALL))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = _cli("factorial", tmp_path / "spec.yaml", "--slurm", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plugins = " ".join(f"--plugin={path}" for path in ALL)
    assert f"launch/slurm.sbatch {plugins} --config " in proc.stdout
    assert f"-m normopt.cli report {plugins} " in proc.stdout
    env = {"NORMOPT_DRY_RUN": "1", "SLURM_JOB_NUM_NODES": "1", "NORMOPT_GPUS_PER_NODE": "1"}
    dry = subprocess.run(
        ["bash", "launch/slurm.sbatch", *plugins.split(), "model.norm=scalenorm", "optim.name=ademamix"],
        cwd=REPO_ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "--plugin=" in dry.stdout + dry.stderr


HELD_OUT = '''
"""An attention and a feed-forward written from docs/extending.md alone."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from normopt.extend import ATTENTIONS, FEED_FORWARDS, MATH, GroupedQueryAttention, require, role


@dataclass
class TemperatureConfig:
    scale: float = role(MATH, 0.5, "tempered: multiplies the attention logits")

    def validate(self):
        require(self.scale > 0, "model.tempered_scale", "must be positive")


@ATTENTIONS.register
class Tempered(GroupedQueryAttention):
    """softmax(scale q k^T / sqrt(h)) v."""

    name = "tempered"
    config = TemperatureConfig

    def __init__(self, args):
        super().__init__(args)
        self.scale = args.options("tempered")["scale"]

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale / q.shape[-1] ** 0.5, enable_gqa=self.n_kv_heads != self.n_heads
        )


@FEED_FORWARDS.register
class ReluSquared(torch.nn.Module):
    """So et al. 2021 (Primer): w2 relu(w1 x)^2."""

    name = "relu2"
    aux_loss_name = None
    matrix_components = {"ffn.w1": "ffn", "ffn.w2": "ffn"}

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = torch.nn.Linear(dim, hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.relu(self.w1(x)).square())

    def input_matrices(self):
        return [self.w1.weight]

    def output_matrices(self):
        return [self.w2.weight]

    @classmethod
    def build(cls, args):
        return cls(args.dim, args.ffn_hidden)

    @classmethod
    def check_shapes(cls, args):
        pass

    @classmethod
    def fill_shapes(cls, args):
        return {}

    @classmethod
    def param_counts(cls, args):
        return (2 * args.dim * args.ffn_hidden,) * 2

    @classmethod
    def saved_bytes_per_token(cls, args, compute_bytes):
        return 2 * compute_bytes * args.ffn_hidden

    @classmethod
    def describe(cls, args, total_params, active_params):
        return "ffn: relu2"
'''


def test_a_held_out_attention_and_feed_forward(tmp_path, tiny_corpus):
    """Written from the docs: they train, keep their own key, continue a finished run, report,
    and are refused by the Hugging Face export in one line (safetensors exports them)."""
    plugin = tmp_path / "held_out.py"
    plugin.write_text(HELD_OUT)
    run_dir = tmp_path / "run"
    args = [f"--plugin={plugin}", *tiny_run_args(run_dir, tiny_corpus, "model.attention=tempered", "model.ffn=relu2")]
    proc = run_cli([*args, "model.tempered_scale=2.0"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml_load(run_dir / "config.yaml")["model"]["tempered_scale"] == 2.0
    refused = run_cli([*args, "model.tempered_scale=2.0", "train.steps=8", "model.tempered_scale=1.0"])
    assert "model.tempered_scale: the run being resumed used 2.0" in _one_line(refused)
    assert run_cli([*args, "model.tempered_scale=2.0", "train.steps=8"]).returncode == 0
    line = _one_line(_cli("export", run_dir, "--format", "hf", f"--plugin={plugin}"))
    assert "plugin attention tempered (held_out): --format hf exports built-in attentions" in line
    assert _cli("export", run_dir, f"--plugin={plugin}").returncode == 0
    report = _cli("report", tmp_path, f"--plugin={plugin}")
    assert report.returncode == 0, report.stderr[-2000:]


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())
