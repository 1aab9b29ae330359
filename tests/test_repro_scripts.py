"""The paper-reproduction scripts run end to end (``--quick``), write their table and plot, and PSGD
reaches their problems' known answers."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
BASELINES = ["AdamW", "SGD momentum 0.9"]


def _quick_run(tmp_path: Path, script: str, name: str) -> dict[str, list[str]]:
    """Run ``scripts/<script> --quick``; check that it wrote ``<name>.png``; the cells of ``<name>.md``'s
    table rows by their first cell."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPTS / script), "--quick", "--out-dir", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, env=env, timeout=120)
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    rows = [line.strip(" |").split(" | ") for line in (tmp_path / f"{name}.md").read_text().splitlines()]
    return {cells[0]: cells[1:] for cells in rows if len(cells) > 1}


@pytest.mark.slow
def test_delayed_xor_quick_run_and_psgd_solves_short_sequences(tmp_path: Path, monkeypatch) -> None:
    """The quick run's 30 iterations are too few to solve anything, so the known answer comes from the
    script's own training loop: XOR of two signs is exactly learnable, and PSGD-LRA (exact H v) reaches
    the script's 99% held-out accuracy at length 8 (in 110 iterations; chance: 50%, loss ln 2)."""
    psgd = "PSGD-LRA (hvp, rank 10)"
    assert {psgd, *BASELINES} <= set(_quick_run(tmp_path, "repro_delayed_xor.py", "delayed_xor"))
    monkeypatch.syspath_prepend(str(SCRIPTS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the script's default: its tiny RNN is many times slower on 2 threads of a busy CPU
    try:
        run = importlib.import_module("repro_delayed_xor").train(psgd, lr=0.1, length=8, seed=0, budget=300, cell="rnn")
    finally:
        torch.set_num_threads(threads)
    assert run.iterations is not None, f"unsolved in 300 iterations: held-out loss {run.held_out_loss[-1]:.3f}"


@pytest.mark.slow
def test_digits_quick_run_psgd_far_above_chance(tmp_path: Path) -> None:
    """After the quick run's 2 epochs every PSGD-LRA rank classifies at least 35% of the clean test
    digits right (chance: 10%; they reach about 52%)."""
    table = _quick_run(tmp_path, "repro_digits_lenet.py", "digits_lenet")
    assert set(BASELINES) <= set(table)
    for rank in (0, 1, 2, 5, 10):
        clean_final = float(table[f"PSGD-LRA r={rank}"][1].split(" ±")[0])
        assert clean_final >= 35, f"rank {rank}: {clean_final}% of the test digits"


def test_quality_suite_learning_rate_rule(monkeypatch) -> None:
    """PSGD's rate in the quality suite: with whitening ``learning_rate_from_adamw`` of tuned AdamW's (``None``
    until AdamW's is known), AdamW's own under ``adamw-1x``; PSGD's per-curvature default with exact H v and under
    the ``default`` rule; times the scale."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("bench_quality")
    tasks = importlib.import_module("quality.tasks").TASKS_BY_NAME
    whiten, hvp = tasks["friedman-mlp"], tasks["friedman-mlp-hvp"]
    assert bench.psgd_lr(whiten, 0.01) == 3e-3 and bench.psgd_lr(whiten, 1e-3) == 2e-3
    assert bench.psgd_lr(whiten, None) is None
    assert bench.psgd_lr(whiten, 1e-3, scale=0.5) == 1e-3
    assert bench.psgd_lr(whiten, 0.01, rule="adamw-1x") == 0.01
    assert bench.psgd_lr(hvp, 0.01) == bench.psgd_lr(hvp, None) == 0.3
    assert bench.psgd_lr(whiten, 0.01, rule="default") == 3e-3


def test_psgd_code_hash_ignores_docstrings_and_comments_but_not_code(monkeypatch, tmp_path: Path) -> None:
    """Cached PSGD runs stay valid through a docstring or comment edit, never through a code edit."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    code_hash = importlib.import_module("quality.optimizers").code_hash
    module = tmp_path / "step.py"

    def hashed(source: str) -> str:
        module.write_text(source)
        return code_hash(tmp_path)

    original = hashed('"""Module."""\n\ndef step(x):\n    """Doubles."""\n    return 2 * x\n')
    assert hashed('"""Other."""\n\n\ndef step(x):  # note\n    """Twice x."""\n    return 2*x\n') == original
    assert hashed('"""Module."""\n\ndef step(x):\n    """Doubles."""\n    return 3 * x\n') != original
    assert hashed("def step(x):\n    return 2 * x\n\nRATE = 1\n") != original


def test_quality_suite_seeds_per_task(monkeypatch, tmp_path: Path) -> None:
    """Each task runs its own number of seeds (more on the small, noisy ones) unless ``--seeds`` sets one for all;
    ``--seeds`` below 1 is refused."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("bench_quality")
    tasks = importlib.import_module("quality.tasks").TASKS_BY_NAME
    own = bench.make_suite(bench.parse_args(["--cache-dir", str(tmp_path)]))
    assert own.seeds_for(tasks["gpt-arithmetic"]) == [0, 1, 2]
    assert own.seeds_for(tasks["digits-lenet"]) == own.seeds_for(tasks["friedman-mlp-hvp"]) == list(range(10))
    override = bench.make_suite(bench.parse_args(["--seeds", "2", "--cache-dir", str(tmp_path)]))
    assert override.seeds_for(tasks["digits-lenet"]) == override.seeds_for(tasks["gpt-arithmetic"]) == [0, 1]
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "0"])


def test_quality_suite_validates_psgd_options_with_each_tasks_own(monkeypatch, tmp_path: Path) -> None:
    """``--psgd-options`` valid only with exact H v (``secant_pairs``) passes on the exact-H v tasks, keeps out the
    task's own ``curvature``, and is refused on a whitening task with the task named."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("bench_quality")
    tasks = importlib.import_module("quality.tasks").TASKS_BY_NAME
    args = bench.parse_args(["--psgd-options", "secant_pairs=true", "--label", "secant", "--cache-dir", str(tmp_path)])
    twin = tasks["digits-lenet-hvp"]
    suite = bench.make_suite(args, [twin])
    assert suite.psgd_options == {"secant_pairs": True}
    assert suite.psgd(twin).options == {"curvature": "hvp", "secant_pairs": True}
    with pytest.raises(SystemExit, match="on digits-lenet .*its own options: none.*secant_pairs=True is invalid"):
        bench.make_suite(args, [twin, tasks["digits-lenet"]])


def test_quality_suite_exact_hvp_twins_share_their_baselines(monkeypatch, tmp_path: Path) -> None:
    """AdamW and the anchors do not depend on PSGD's options: an exact-H v task reads and writes their runs under
    the task it was made from; its PSGD runs stay its own."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("bench_quality")
    optimizers = importlib.import_module("quality.optimizers")
    tasks = importlib.import_module("quality.tasks").TASKS_BY_NAME
    suite = bench.make_suite(bench.parse_args(["--cache-dir", str(tmp_path)]))
    base, twin = tasks["digits-lenet"], tasks["digits-lenet-hvp"]
    assert suite.run_id(twin, optimizers.ADAMW, 0.01, 1) == suite.run_id(base, optimizers.ADAMW, 0.01, 1)
    assert suite.run_id(twin, optimizers.ADAMW, 0.01, 1).task == "digits-lenet"
    twin_psgd, base_psgd = suite.run_id(twin, suite.psgd(twin), 0.3, 1), suite.run_id(base, suite.psgd(base), 0.3, 1)
    assert twin_psgd.task == "digits-lenet-hvp" and twin_psgd.key() != base_psgd.key()
    newton = optimizers.PSGD_TORCH_NEWTON  # the anchor of the twin's curvature: the twin's own, only there
    assert suite.run_id(twin, newton, 0.3, 1).task == "digits-lenet-hvp"
    grids = {task.name: dict((spec.name, grid) for spec, grid in suite.plan(task, 0.01)) for task in (base, twin)}
    assert grids["digits-lenet"]["psgd-torch-newton"] == () and len(grids["digits-lenet-hvp"]["psgd-torch-newton"]) > 1


def _entry(name: str, losses: list[float], grid: tuple[float, ...] = (0.1,)) -> object:
    """A suite entry of ``name`` with one run per loss (of two seeds asked for) at the first rate of ``grid``."""
    suite = importlib.import_module("quality.suite")
    record = {"metrics": {}, "train_seconds": 1.0, "eval_seconds": 0.0, "trainable_params": 1}
    runs = [{"eval_loss": loss, **record} for loss in losses]
    return suite.Entry(name, grid, {}, grid[0] if grid else None, runs, 2)


def test_quality_report_best_anchor_counts_the_newton_anchor_where_it_ran(monkeypatch) -> None:
    """The best anchor is the lowest mean of the anchors that ran on every seed, psgd-torch's Newton included on the
    exact-H v tasks; where an optimizer has no grid its cell is a dash, and the exact-H v gaps to Newton are listed."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    report = importlib.import_module("quality.report")
    tasks = importlib.import_module("quality.tasks").TASKS_BY_NAME

    def result(task: str, newton: list[float], newton_grid: tuple[float, ...]) -> object:
        entries = {"adamw": _entry("adamw", [1.0, 1.0]), "psgd": _entry("psgd", [0.9, 0.9])}
        entries |= {name: _entry(name, [0.8, 0.8]) for name in ("kron-torch", "heavyball")}
        entries["psgd-torch"] = _entry("psgd-torch", [0.7])  # one seed of two: not complete, not counted
        entries["psgd-torch-newton"] = _entry("psgd-torch-newton", newton, newton_grid)
        return report.TaskResult(tasks[task], entries, 0.1)

    whiten, hvp = result("digits-lenet", [], ()), result("digits-lenet-hvp", [0.6, 0.6], (0.3,))
    assert whiten.best_anchor().optimizer == "kron-torch" and hvp.best_anchor().optimizer == "psgd-torch-newton"
    assert whiten.gap(whiten.best_anchor()) == pytest.approx(0.125) and hvp.gap(hvp.best_anchor()) == pytest.approx(0.5)
    rows = report.results_table([whiten, hvp], "defaults").splitlines()
    assert rows[2].split(" | ")[-3] == "—" and rows[3].split(" | ")[-3].startswith("**0.6")
    assert "digits-lenet-hvp +50.0%" in report.same_curvature_line([whiten, hvp])[0]


def test_quality_report_keeps_held_out_tasks_out_of_the_summary(monkeypatch, tmp_path: Path) -> None:
    """Held-out tasks (never used to choose a default) get their own table and summary after the others'; the
    summary of the tasks the defaults were chosen on does not count them."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench, report = importlib.import_module("bench_quality"), importlib.import_module("quality.report")
    tasks = importlib.import_module("quality.tasks").TASKS_BY_NAME
    assert {name for name, task in tasks.items() if task.held_out} >= {"gpt-pydoc-short", "digits-autoencoder-hvp"}

    def result(task: str, psgd: float) -> object:
        entries = {name: _entry(name, [1.0, 1.0]) for name in ("adamw", "kron-torch", "heavyball", "psgd-torch")}
        entries |= {"psgd": _entry("psgd", [psgd, psgd]), "psgd-torch-newton": _entry("psgd-torch-newton", [], ())}
        return report.TaskResult(tasks[task], entries, 0.1)

    suite = bench.make_suite(bench.parse_args(["--cache-dir", str(tmp_path)]))
    text = report.render([result("digits-lenet", 0.9), result("digits-autoencoder", 1.2)], suite, 1.0, 1)
    chosen_on, held_out = text.split("## Held-out tasks")
    assert "on 1 of 1 tasks" in chosen_on and "-10.0%" in chosen_on and "digits-autoencoder" not in chosen_on
    assert "on 0 of 1 tasks" in held_out.split("## Other")[0] and "+20.0%" in held_out


def test_quality_cache_keeps_runs_of_invocations_sharing_a_task(monkeypatch, tmp_path: Path) -> None:
    """Two invocations on one task (two ablations on two cores) each write after every run: neither drops the
    other's runs, and a record read before the other's write is still found after this one's."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    cache = importlib.import_module("quality.cache")
    first, second = cache.ResultCache(tmp_path), cache.ResultCache(tmp_path)
    runs = [cache.RunId("digits-lenet", "f", "psgd", label, "v", 0.01, 0) for label in ("a", "b", "c")]
    assert first.get(runs[0]) is None and second.get(runs[1]) is None  # both read the (empty) task first
    first.put(runs[0], {"eval_loss": 1.0})
    second.put(runs[1], {"eval_loss": 2.0})
    first.put(runs[2], {"eval_loss": 3.0})
    on_disk = cache.ResultCache(tmp_path)
    assert [on_disk.get(run)["eval_loss"] for run in runs] == [1.0, 2.0, 3.0]
    assert second.get(runs[0])["eval_loss"] == 1.0 and first.get(runs[1])["eval_loss"] == 2.0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["digits-lenet.json", "digits-lenet.json.lock"]


def test_gpu_benchmark_smoke_run_on_the_cpu(tmp_path: Path) -> None:
    """``scripts/bench_gpu.py`` runs end to end (here on the CPU, a tiny model, hf_psgd and AdamW rows
    only) and writes its table with the derived default-schedule row."""
    out = tmp_path / "gpu.md"
    command = [sys.executable, str(SCRIPTS / "bench_gpu.py"), "--device", "cpu", "--models", "tiny", "--rounds", "1"]
    command += ["--iters", "1", "--warmup", "1", "--skip-tests", "--only", "adamw,psgd,psgd-apply,psgd-hvp"]
    subprocess.run([*command, "--out", str(out)], check=True, capture_output=True, timeout=120)
    table = out.read_text()
    for row in ("`adamw`", "`psgd`", "`psgd-apply`", "`psgd-hvp`", "`psgd@0.03`"):
        assert row in table
    if not torch.cuda.is_available():  # a CUDA run without a CUDA device says so and stops
        result = subprocess.run([sys.executable, str(SCRIPTS / "bench_gpu.py")], capture_output=True, text=True)
        assert result.returncode != 0 and "no CUDA device here" in result.stderr


@pytest.mark.parametrize("script", sorted(path.stem for path in SCRIPTS.glob("*.py")))
def test_every_script_imports(monkeypatch, script: str) -> None:
    """Every script's imports resolve (scripts share helpers: a renamed one broke two benchmarks unnoticed)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    importlib.import_module(script)


def test_sharding_benchmark_times_methods_the_optimizer_has(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    from hf_psgd import PSGD

    assert all(callable(getattr(PSGD, name, None)) for name in importlib.import_module("bench_sharding").BLOCK_WORK)
