"""Feel the target's speed on this host: every forward step of a chat slowed to the simulated target latency.

CXLMemSim (arXiv 2303.06153) runs an unmodified program and injects, per epoch, the delay by which the simulated
memory hierarchy would be slower than the real one. Here an epoch is one forward call of the runtime (the
prompt's prefill, then one call per decoded token), and the simulated time is the epoch model's for the bundle
on the profile (toolkit.plan.simulator.TargetClock, at the cached position and token count of that very call):

    host_s   = the call's wall time on this host
    target_s = clock.prefill_seconds(tokens, cached)  for a call of several tokens (the prompt)
               clock.decode_seconds(cached)           for one token
    wait     = max(0, target_s - host_s), slept before the call returns

so the first token appears after the target's time to first token and each next one after the target's step
latency at that position. When this host is slower than the target (host_s > target_s) nothing can be taken
back: the step is counted in `host_slower_steps` and the emulation runs slower than the target would.

The runner's public `forward` is wrapped on the instance (Runner.generate and forward_parts call it), so the
runtimes need no hook of their own. Images (forward_image) are not delayed: the simulator has no vision tower.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from runtimes.runner import Runner
from toolkit.plan.simulator import TargetClock


@dataclass(frozen=True)
class Step:
    """One forward call: where it started, how many tokens, and its time here, on the target, and waited."""

    position: int  # tokens cached before the call
    tokens: int
    kind: str  # "prefill" (the prompt) or "decode" (one token)
    host_s: float
    target_s: float
    waited_s: float


@dataclass
class DelayInjector:
    """Wraps `runner.forward` while installed (`with injector.installed(): ...`) and records every step."""

    runner: Runner
    clock: TargetClock
    sleep: Callable[[float], None] = time.sleep
    timer: Callable[[], float] = time.perf_counter
    steps: list[Step] = field(default_factory=list)

    @contextmanager
    def installed(self) -> Iterator[DelayInjector]:
        """Route the runner's forward calls through the injector; the class's own method comes back after."""
        original = self.runner.forward

        def forward(ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
            cached = self.runner.n_past
            start = self.timer()
            logits = original(ids, all_logits)
            host = self.timer() - start
            self._wait(cached, len(ids), host)
            return logits

        self.runner.forward = forward  # type: ignore[method-assign]
        try:
            yield self
        finally:
            del self.runner.forward  # the instance attribute; Runner.forward shows through again

    def _wait(self, cached: int, tokens: int, host: float) -> None:
        prompt = tokens > 1 or not self.steps  # the first call of a turn is its prompt (generate starts empty)
        target = self.clock.prefill_seconds(tokens, cached) if prompt else self.clock.decode_seconds(cached)
        wait = max(0.0, target - host)
        if wait > 0:
            self.sleep(wait)
        self.steps.append(Step(cached, tokens, "prefill" if prompt else "decode", host, target, wait))

    def new_turn(self) -> None:
        """Forget the steps of the last turn (the next call is a prompt again)."""
        self.steps = []


@dataclass(frozen=True)
class TurnReport:
    """What one answer took on the target (emulated) and on this host alone."""

    steps: list[Step]

    @property
    def ttft_target_s(self) -> float:
        return sum(s.target_s for s in self.steps if s.kind == "prefill")

    @property
    def ttft_host_s(self) -> float:
        return sum(s.host_s for s in self.steps if s.kind == "prefill")

    @property
    def host_slower_steps(self) -> int:
        return sum(1 for s in self.steps if s.host_s > s.target_s)

    def decode_rate(self, key: str) -> float | None:
        """Decoded tokens/s over the decode steps, by "target_s" or "host_s"; None without decode steps."""
        seconds = sum(getattr(s, key) for s in self.steps if s.kind == "decode")
        count = sum(1 for s in self.steps if s.kind == "decode")
        return count / seconds if count and seconds > 0 else None

    def summary(self) -> str:
        """One line for the terminal: the target's pace, this host's, and whether the host kept up."""
        target, host = self.decode_rate("target_s"), self.decode_rate("host_s")
        decode = (
            f"; decode {target:.2f} tok/s on the target, {host:.2f} tok/s on this host alone"
            if target and host
            else ""
        )
        slower = self.host_slower_steps
        lag = (
            f"; this host was slower than the target at {slower} of {len(self.steps)} steps, so the emulation ran "
            "slower than the target would"
            if slower
            else ""
        )
        return (
            f"emulated: first token after {self.ttft_target_s:.2f} s (target; this host {self.ttft_host_s:.2f} s)"
            f"{decode}; waited {sum(s.waited_s for s in self.steps):.2f} s in all{lag}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ttft_target_s": round(self.ttft_target_s, 6),
            "ttft_host_s": round(self.ttft_host_s, 6),
            "decode_tokens_per_s_target": self.decode_rate("target_s"),
            "decode_tokens_per_s_host": self.decode_rate("host_s"),
            "host_slower_steps": self.host_slower_steps,
            "steps": [
                {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(step).items()}
                for step in self.steps
            ],
        }
