"""bedside emulate's delay injection (fake runner and clock: exact waits) and simulate --plot (issue 15, part 6)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.test_simulator import CONFIG, UNIT
from toolkit.deploy.emulate import DelayInjector, TurnReport
from toolkit.model.facts import facts_from_config
from toolkit.plan.memory import Deployment
from toolkit.plan.simulator import target_clock
from toolkit.plan.workload import make_workload
from toolkit.target.profiles import load_profile


class FakeRunner:
    """n_past and forward, as Runner has them; each call takes `host_s` of fake time."""

    def __init__(self, clock: list[float], host_s: float) -> None:
        self.n_past = 0
        self.clock, self.host_s = clock, host_s

    def forward(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        self.clock[0] += self.host_s
        self.n_past += len(ids)
        return np.zeros((1, 4), np.float32)


class FakeClock:
    def prefill_seconds(self, tokens: int, cached: int = 0) -> float:
        return 0.5

    def decode_seconds(self, cached: int) -> float:
        return 0.1 + cached * 0.001


def _run(host_s: float) -> tuple[TurnReport, list[float], FakeRunner]:
    now = [0.0]
    slept: list[float] = []
    runner = FakeRunner(now, host_s)
    injector = DelayInjector(runner, FakeClock(), sleep=slept.append, timer=lambda: now[0])  # type: ignore[arg-type]
    with injector.installed():
        runner.forward([1, 2, 3])  # the prompt
        for token in range(4):
            runner.forward([token])
    assert "forward" not in vars(runner)  # the class's method shows through again
    return TurnReport(list(injector.steps)), slept, runner


def test_each_step_waits_the_difference_to_the_target():
    report, slept, _ = _run(host_s=0.02)
    assert [s.kind for s in report.steps] == ["prefill"] + ["decode"] * 4
    assert slept == pytest.approx([0.48] + [0.1 + p * 0.001 - 0.02 for p in (3, 4, 5, 6)])
    assert report.ttft_target_s == pytest.approx(0.5) and report.ttft_host_s == pytest.approx(0.02)
    assert report.host_slower_steps == 0 and "slower than the target" not in report.summary()
    data = report.to_json()
    assert [s["position"] for s in data["steps"]] == [0, 3, 4, 5, 6]
    assert data["steps"][1]["target_s"] == pytest.approx(0.103) and data["steps"][1]["host_s"] == 0.02


def test_a_slower_host_is_reported_not_hidden():
    report, slept, _ = _run(host_s=0.3)
    assert slept == pytest.approx([0.2])  # only the prompt was faster here than on the target
    assert report.host_slower_steps == 4
    assert "slower than the target at 4 of 5 steps" in report.summary()


def test_target_clock_is_the_simulators_epoch_time():
    facts = facts_from_config(CONFIG)
    profile = load_profile("workstation-cpu-16gb")
    workload = make_workload(facts, Deployment("gguf", "Q8_0", runtime="llama.cpp"), profile)
    clock, result = target_clock(workload, profile, context=512, record=UNIT)
    assert clock.decode_seconds(511) == pytest.approx(result.per_token_latency_s[-1])
    assert clock.prefill_seconds(result.prompt_tokens) == pytest.approx(result.ttft_s)


def test_simulate_writes_a_latency_plot_per_placement(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from toolkit.cli.main import main
    from toolkit.plan.planner import make_plan
    from toolkit.plan.schema import write_plan

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**CONFIG, "architectures": ["LlamaForCausalLM"]}))
    plan = make_plan(facts_from_config(CONFIG), load_profile("rtx3050-4gb"), str(model), format="gguf",
                     quant="Q8_0", prune_layers=0, context=1024)  # fmt: skip
    write_plan(plan, tmp_path / "plan.json")
    png = tmp_path / "latency.png"
    argv = ["bedside", "simulate", "--profile", "rtx3050-4gb", "--plan", str(tmp_path / "plan.json"),
            "--placement", "auto", "--plot", str(png), "--json"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    main()
    data = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chosen = data["placement"]["label"]
    assert data["latency_by_placement"][chosen] == data["per_token_latency_s"]
    monkeypatch.setattr(sys, "argv", [*argv[:-3], "--plot", str(tmp_path / "latency.txt")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and "--plot" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["../outside.gguf", "/etc/passwd", "linked.gguf"])
def test_a_bundle_whose_model_leads_outside_is_refused(tmp_path, monkeypatch, capsys, model):
    """runtime.json is untrusted: a model path (or a link) that leaves the bundle folder is one line, exit 2."""
    from toolkit.cli.main import main

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (tmp_path / "outside.gguf").write_bytes(b"GGUF")
    (bundle / "linked.gguf").symlink_to(tmp_path / "outside.gguf")
    (bundle / "runtime.json").write_text(json.dumps({"model": model, "runtime": "llama.cpp"}))
    monkeypatch.setattr(sys, "argv", ["bedside", "emulate", "--profile", "host", str(bundle), "--prompt", "hi"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "leads outside" in err and len(err.strip().splitlines()) == 1


def test_a_truncated_gguf_in_a_bundle_is_one_line(tmp_path, monkeypatch, capsys):
    from toolkit.cli.main import main

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "runtime.json").write_text(json.dumps({"model": "m.gguf", "runtime": "llama.cpp"}))
    monkeypatch.setattr(sys, "argv", ["bedside", "simulate", "--profile", "host", "--bundle", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "truncated inside the GGUF header" in err and len(err.strip().splitlines()) == 1
