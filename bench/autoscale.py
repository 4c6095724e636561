#!/usr/bin/env python3
"""Replay arrival patterns against the worker ScaledObject and show what autoscaling does.

The scaling settings are read from k8s/base/worker-scaledobject.yaml, so this simulation and
the cluster cannot drift apart. What is modelled, second by second:

- the signals, as Prometheus sees them `--metric-lag-s` late (one scrape + one rule
  evaluation) and sampled every 15 s: captioner:images_backlog (images waiting + in flight)
  and, if the ScaledObject has that trigger too, the images finished per second;
- KEDA (every pollingInterval): active when any trigger is strictly above its
  activationThreshold; 0 -> 1 replica on activation; 1 -> 0 after cooldownPeriod without
  activity (cooldownPeriod applies to scaling to zero only);
- the HPA KEDA creates (every 15 s, replicas >= 1): AverageValue targets, so per trigger
  desired = ceil(metric / threshold), kept at the current count within the 10% tolerance,
  the largest proposal wins, clamped to [max(1, minReplicaCount), maxReplicaCount]; then the
  behavior block: stabilization windows (up: min, down: max of recent recommendations) and
  the scaleUp/scaleDown policies (Pods/Percent per periodSeconds, selectPolicy), as
  kube-controller-manager computes them;
- pods: a new pod finishes nothing for `--startup-s` (GPU node, image pull, model load,
  warm-up), then `--throughput` images/s; scale-down removes starting pods first;
- the queues: captions.realtime is served before captions.bulk, FIFO within each.

Per scenario it prints one row per backlog threshold (x0.5, x1, x2 of the YAML's by
default): peak replicas, queue wait p50/p99 per queue (arrival to done), when the last image
finished, GPU-hours (pod lifetime, start-up included) and scaling events, then replicas
over time side by side; last, the cooldownPeriod trade-off for sparse uploads.
Stdlib + PyYAML only.

    python bench/autoscale.py
    python bench/autoscale.py --throughput 12 --thresholds 960,1440 --scenario upload-burst
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCALED_OBJECT = ROOT / "k8s" / "base" / "worker-scaledobject.yaml"
HPA_SYNC_S = 15  # kube-controller-manager --horizontal-pod-autoscaler-sync-period
HPA_TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance
SCRAPE_S = 15  # Prometheus scrape and rule evaluation interval
FLAP_WINDOW_S = 600  # a direction change this soon after the last change counts as a flip


# --- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    kind: str  # Pods | Percent
    value: int
    period_s: int


@dataclass(frozen=True)
class Rules:
    window_s: int
    select: str  # Max | Min | Disabled
    policies: tuple[Policy, ...]

    def describe(self) -> str:
        return f"window {self.window_s}s, {self.select} of " + ", ".join(
            f"{p.kind} {p.value}/{p.period_s}s" for p in self.policies)


@dataclass(frozen=True)
class Trigger:
    signal: str  # "backlog" (images waiting + in flight) | "finished" (images/s finished)
    threshold: float
    activation: float
    window_s: int = 0  # rate window of a "finished" trigger


@dataclass(frozen=True)
class Scaling:
    polling_s: int
    cooldown_s: int
    min_replicas: int
    max_replicas: int
    triggers: tuple[Trigger, ...]
    up: Rules
    down: Rules

    @property
    def threshold(self) -> float:
        return next(t.threshold for t in self.triggers if t.signal == "backlog")

    def with_threshold(self, threshold: float) -> Scaling:
        triggers = tuple(dataclasses.replace(t, threshold=threshold) if t.signal == "backlog"
                         else t for t in self.triggers)
        return dataclasses.replace(self, triggers=triggers)


# Kubernetes' defaults for a behavior block that leaves parts out.
DEFAULT_UP = {"stabilizationWindowSeconds": 0, "selectPolicy": "Max", "policies": [
    {"type": "Pods", "value": 4, "periodSeconds": 15},
    {"type": "Percent", "value": 100, "periodSeconds": 15}]}
DEFAULT_DOWN = {"stabilizationWindowSeconds": 300, "selectPolicy": "Max", "policies": [
    {"type": "Percent", "value": 100, "periodSeconds": 15}]}


def parse_rules(block: dict | None, default: dict) -> Rules:
    block = {**default, **(block or {})}
    return Rules(
        window_s=int(block["stabilizationWindowSeconds"]),
        select=block["selectPolicy"],
        policies=tuple(Policy(p["type"], int(p["value"]), int(p["periodSeconds"]))
                       for p in block["policies"]),
    )


def parse_trigger(trigger: dict) -> Trigger:
    if trigger["type"] != "prometheus":
        raise SystemExit(f"only prometheus triggers are modelled, not {trigger['type']}")
    if trigger.get("metricType", "AverageValue") != "AverageValue":
        raise SystemExit("only metricType AverageValue is modelled")
    meta = trigger["metadata"]
    query = meta["query"]
    threshold, activation = float(meta["threshold"]), float(meta.get("activationThreshold", 0))
    if "captioner:images_backlog" in query:
        return Trigger("backlog", threshold, activation)
    if "captioner:images_finished:rate2m" in query:
        return Trigger("finished", threshold, activation, window_s=120)
    raise SystemExit(f"no model for the query {query!r}")


def load_scaling(path: Path = SCALED_OBJECT) -> Scaling:
    spec = yaml.safe_load(path.read_text())["spec"]
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
    return Scaling(
        polling_s=int(spec.get("pollingInterval", 30)),
        cooldown_s=int(spec.get("cooldownPeriod", 300)),
        min_replicas=int(spec.get("minReplicaCount", 0)),
        max_replicas=int(spec.get("maxReplicaCount", 100)),
        triggers=tuple(parse_trigger(t) for t in spec["triggers"]),
        up=parse_rules(behavior.get("scaleUp"), DEFAULT_UP),
        down=parse_rules(behavior.get("scaleDown"), DEFAULT_DOWN),
    )


# --- the HPA, as kube-controller-manager computes it ----------------------------------------


@dataclass
class Hpa:
    scaling: Scaling
    recommendations: list[tuple[int, int]] = field(default_factory=list)
    up_events: list[tuple[int, int]] = field(default_factory=list)
    down_events: list[tuple[int, int]] = field(default_factory=list)

    def desired(self, now: int, current: int, metrics: list[float]) -> int:
        proposals = []
        for trigger, metric in zip(self.scaling.triggers, metrics, strict=True):
            ratio = metric / (trigger.threshold * current)
            proposals.append(current if abs(ratio - 1) <= HPA_TOLERANCE
                             else math.ceil(metric / trigger.threshold))
        stabilized = self.stabilize(now, current, max(proposals))
        return self.rate_limit(now, current, stabilized)

    def stabilize(self, now: int, current: int, desired: int) -> int:
        if not self.recommendations and self.scaling.down.window_s:
            # A new HPA first holds what runs (maybeInitScaleDownStabilizationWindow).
            self.recommendations.append((now, current))
        up_cutoff, down_cutoff = now - self.scaling.up.window_s, now - self.scaling.down.window_s
        up, down = desired, desired
        for at, recommendation in self.recommendations:
            if at > up_cutoff:
                up = min(up, recommendation)
            if at > down_cutoff:
                down = max(down, recommendation)
        keep = max(self.scaling.up.window_s, self.scaling.down.window_s)
        self.recommendations = [(a, r) for a, r in self.recommendations if a > now - keep]
        self.recommendations.append((now, desired))
        return min(max(current, up), down)

    @staticmethod
    def changed(events: list[tuple[int, int]], now: int, period_s: int) -> int:
        return sum(n for at, n in events if at > now - period_s)

    def limit(self, now: int, current: int, rules: Rules, up: bool) -> int:
        if rules.select == "Disabled":
            return current
        proposals = []
        for p in rules.policies:
            start = (current - self.changed(self.up_events, now, p.period_s)
                     + self.changed(self.down_events, now, p.period_s))
            if p.kind == "Pods":
                proposals.append(start + p.value if up else start - p.value)
            elif up:
                proposals.append(math.ceil(start * (1 + p.value / 100)))
            else:
                proposals.append(int(start * (1 - p.value / 100)))
        # selectPolicy Max: the policy allowing the biggest change; Min: the smallest.
        if rules.select == "Max":
            return max(proposals) if up else min(proposals)
        return min(proposals) if up else max(proposals)

    def rate_limit(self, now: int, current: int, desired: int) -> int:
        s = self.scaling
        low, high = max(1, s.min_replicas), s.max_replicas
        if desired > current:
            high = min(high, max(current, self.limit(now, current, s.up, up=True)))
        elif desired < current:
            low = max(low, min(current, self.limit(now, current, s.down, up=False)))
        return min(max(desired, low), high)

    def record(self, now: int, before: int, after: int) -> None:
        if after > before:
            self.up_events.append((now, after - before))
        elif after < before:
            self.down_events.append((now, before - after))
        horizon = now - 3600
        self.up_events = [e for e in self.up_events if e[0] > horizon]
        self.down_events = [e for e in self.down_events if e[0] > horizon]


# --- scenarios --------------------------------------------------------------------------------

Arrivals = Callable[[int, float], tuple[float, float]]


@dataclass
class Scenario:
    name: str
    about: str
    duration_s: int
    # (second, images waiting on captions.bulk) -> (realtime, bulk) images arriving then.
    arrivals: Arrivals
    warm_replicas: int = 0


def upload_burst(t: int, _bulk: float) -> tuple[float, float]:
    return (250.0 if 300 <= t < 360 else 0.0), 0.0


def steady_uploads(t: int, _bulk: float) -> tuple[float, float]:
    return (40.0 if t < 2 * 3600 else 0.0), 0.0


class PacedBackfill:
    """`captioner backfill --max-queue-depth`: keeps captions.bulk topped up to a cap until
    the prefix is listed; plus an upload burst in the middle."""

    def __init__(self, total: int, cap: int) -> None:
        self.total, self.cap, self.sent = total, cap, 0.0

    def __call__(self, t: int, bulk: float) -> tuple[float, float]:
        send = min(self.total - self.sent, max(0.0, self.cap - bulk))
        self.sent += send
        return (100.0 if 2400 <= t < 2420 else 0.0), send


class SparseUploads:
    """A batch of 20 uploads about every 20 minutes (seeded jitter)."""

    def __init__(self) -> None:
        rng = random.Random(7)
        self.at = {int(i * 1200 + rng.uniform(0, 300)) for i in range(9)}

    def __call__(self, t: int, _bulk: float) -> tuple[float, float]:
        return (20.0 if t in self.at else 0.0), 0.0


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "upload-burst": lambda: Scenario(
        "upload-burst", "idle fleet; 15,000 uploads within one minute at t=5m",
        60 * 60, upload_burst),
    "steady-uploads": lambda: Scenario(
        "steady-uploads", "40 uploads/s for 2 h (needs 5 workers at 8 images/s)",
        150 * 60, steady_uploads),
    "paced-backfill": lambda: Scenario(
        "paced-backfill",
        "400,000 images kept at --max-queue-depth = 16,000 images; 2,000 uploads at t=40m",
        150 * 60, PacedBackfill(total=400_000, cap=16_000)),
    "sparse-uploads": lambda: Scenario(
        "sparse-uploads", "20 uploads about every 20 min for 3 h",
        180 * 60, SparseUploads()),
    "idle": lambda: Scenario(
        "idle", "nothing arrives; 6 workers up after a finished backfill",
        40 * 60, lambda t, b: (0.0, 0.0), warm_replicas=6),
}


# --- the simulation ---------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    images: float = 0.0
    gpu_seconds: float = 0.0
    peak: int = 0
    events: int = 0
    flips: int = 0
    last_done_s: int | None = None
    left: float = 0.0
    waits: dict[str, list[tuple[float, float]]] = field(
        default_factory=lambda: {"realtime": [], "bulk": []})
    timeline: list[tuple[int, int, int, float]] = field(default_factory=list)

    def percentile(self, queue: str, q: float) -> float | None:
        samples = sorted(self.waits[queue])
        total = sum(n for _, n in samples)
        if not total:
            return None
        seen = 0.0
        for wait, n in samples:
            seen += n
            if seen >= q * total - 1e-9:
                return wait
        return samples[-1][0]


@dataclass
class Job:
    queue: str
    arrived: int
    images: int
    left: float = 0.0


@dataclass
class Pod:
    created: int
    job: Job | None = None
    draining: bool = False  # SIGTERM'd: finishes the job in hand, takes no new one

    def ready(self, now: int, startup_s: int) -> bool:
        return now - self.created >= startup_s


class Fleet:
    """Queues, pods and the autoscaler state of one simulated run."""

    def __init__(self, scenario: Scenario, scaling: Scaling, result: Result, *,
                 throughput: float, startup_s: int, job_images: int) -> None:
        self.scaling, self.result = scaling, result
        self.throughput, self.startup_s, self.job_images = throughput, startup_s, job_images
        self.queues: dict[str, deque[Job]] = {"realtime": deque(), "bulk": deque()}
        self.carry = {"realtime": 0.0, "bulk": 0.0}
        self.pods = [Pod(created=-startup_s) for _ in range(scenario.warm_replicas)]
        self.replicas = scenario.warm_replicas
        self.hpa = Hpa(scaling)
        self.backlog_at: list[float] = []
        self.finished_at: list[float] = []  # cumulative images finished by each second's end
        self.finished = 0.0
        self.last_active = 0 if self.replicas else -10**9
        self.last_change, self.last_direction = -10**9, 0

    def enqueue(self, queue: str, now: int, images: float) -> None:
        """Cut this second's arrivals into jobs of up to `job_images` images."""
        total = self.carry[queue] + images
        whole = int(total)
        self.carry[queue] = total - whole
        for start in range(0, whole, self.job_images):
            size = min(self.job_images, whole - start)
            self.queues[queue].append(Job(queue, now, size, float(size)))
        self.result.images += whole

    def work(self, now: int) -> None:
        """Each ready pod works one job at a time, realtime first; a job's images count as
        done (written, acked) when the whole job is."""
        for pod in self.pods:
            if not pod.ready(now, self.startup_s):
                continue
            budget = self.throughput
            while budget > 1e-9:
                if pod.job is None:
                    source = self.queues["realtime"] or self.queues["bulk"]
                    if pod.draining or not source:
                        break
                    pod.job = source.popleft()
                used = min(budget, pod.job.left)
                pod.job.left -= used
                budget -= used
                if pod.job.left <= 1e-9:
                    done_at = now + (self.throughput - budget) / self.throughput
                    self.result.waits[pod.job.queue].append(
                        (done_at - pod.job.arrived, pod.job.images))
                    self.finished += pod.job.images
                    self.result.last_done_s = math.ceil(done_at)
                    pod.job = None
        self.pods = [pod for pod in self.pods if not (pod.draining and pod.job is None)]
        self.finished_at.append(self.finished)
        # The exporter's view: images in waiting jobs plus images in reserved jobs.
        self.backlog_at.append(sum(job.images for q in self.queues.values() for job in q)
                               + sum(pod.job.images for pod in self.pods if pod.job))

    def signal(self, trigger: Trigger, seen_at: int) -> float:
        if seen_at < 0:
            return 0.0
        if trigger.signal == "backlog":
            return self.backlog_at[seen_at]
        start = max(0, seen_at - trigger.window_s)
        return (self.finished_at[seen_at] - self.finished_at[start]) / trigger.window_s

    def decide(self, now: int, metrics: list[float]) -> int:
        """KEDA for 0 <-> 1 every pollingInterval, the HPA for 1 <-> N every 15 s."""
        s, wanted = self.scaling, self.replicas
        if now % s.polling_s == 0:
            if any(m > t.activation for t, m in zip(s.triggers, metrics, strict=True)):
                self.last_active = now
                if self.replicas == 0:
                    wanted = max(1, s.min_replicas)
            elif (self.replicas > 0 and s.min_replicas == 0
                  and now - self.last_active >= s.cooldown_s):
                wanted = 0
        if now % HPA_SYNC_S == 0 and self.replicas >= 1 and wanted == self.replicas:
            wanted = self.hpa.desired(now, self.replicas, metrics)
            self.hpa.record(now, self.replicas, wanted)
        return wanted

    def scale(self, now: int, wanted: int) -> None:
        if wanted == self.replicas:
            return
        direction = 1 if wanted > self.replicas else -1
        self.result.events += 1
        # Flapping is the HPA reversing itself; KEDA's 0 <-> 1 steps are not counted.
        if min(wanted, self.replicas) >= 1:
            if direction != self.last_direction and now - self.last_change < FLAP_WINDOW_S:
                self.result.flips += 1
            self.last_change, self.last_direction = now, direction
        if wanted > self.replicas:
            self.pods += [Pod(created=now) for _ in range(wanted - self.replicas)]
        else:
            # The ReplicaSet deletes pods that are not ready first, then the newest. A
            # deleted worker finishes its job first (grace period), on the GPU bill.
            live = sorted((p for p in self.pods if not p.draining),
                          key=lambda p: (p.ready(now, self.startup_s), -p.created))
            for pod in live[:self.replicas - wanted]:
                pod.draining = True
            self.pods = [p for p in self.pods if not (p.draining and p.job is None)]
        self.replicas = wanted


def simulate(scenario: Scenario, scaling: Scaling, label: str, *, throughput: float,
             startup_s: int, metric_lag_s: int, job_images: int,
             timeline_every_s: int) -> Result:
    result = Result(label=label)
    fleet = Fleet(scenario, scaling, result, throughput=throughput, startup_s=startup_s,
                  job_images=job_images)
    for now in range(scenario.duration_s):
        bulk_waiting = sum(job.images for job in fleet.queues["bulk"])
        for queue, n in zip(("realtime", "bulk"), scenario.arrivals(now, bulk_waiting),
                            strict=True):
            if n > 0:
                fleet.enqueue(queue, now, n)
        fleet.work(now)
        # What Prometheus, and so KEDA and the HPA, sees: the last evaluation, lagged.
        seen_at = (now - metric_lag_s) // SCRAPE_S * SCRAPE_S
        fleet.scale(now, fleet.decide(now, [fleet.signal(t, seen_at) for t in scaling.triggers]))
        result.peak = max(result.peak, fleet.replicas)
        result.gpu_seconds += len(fleet.pods)
        if now % timeline_every_s == 0:
            ready = sum(1 for p in fleet.pods if p.ready(now, startup_s) and not p.draining)
            result.timeline.append((now, fleet.replicas, ready, fleet.backlog_at[-1]))
    result.left = fleet.backlog_at[-1] if fleet.backlog_at else 0.0
    return result


# --- output -----------------------------------------------------------------------------------


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 100:
        return f"{seconds:.0f}s"
    if seconds < 6000:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.2f}h"


def fmt_n(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 10_000 else f"{n:.0f}"


def summary_table(results: list[Result], first: str) -> list[str]:
    lines = [f"   {first:>12}  {'peak':>4}  {'rt p50':>6}  {'rt p99':>6}  {'bulk p50':>8}  "
             f"{'bulk p99':>8}  {'last done':>9}  {'left':>5}  {'GPU-h':>6}  {'events':>6}  "
             f"{'flips':>5}"]
    for r in results:
        lines.append(
            f"   {r.label:>12}  {r.peak:>4}  {fmt_s(r.percentile('realtime', .5)):>6}  "
            f"{fmt_s(r.percentile('realtime', .99)):>6}  {fmt_s(r.percentile('bulk', .5)):>8}  "
            f"{fmt_s(r.percentile('bulk', .99)):>8}  {fmt_s(r.last_done_s):>9}  "
            f"{fmt_n(r.left):>5}  {r.gpu_seconds / 3600:>6.2f}  {r.events:>6}  {r.flips:>5}")
    return lines


def timeline_table(results: list[Result]) -> list[str]:
    lines = ["   replicas (ready) / backlog, every "
             f"{fmt_s(results[0].timeline[1][0] if len(results[0].timeline) > 1 else 0)}:",
             "   " + f"{'t':>6}  " + "  ".join(f"{r.label:>18}" for r in results)]
    for i, (now, *_rest) in enumerate(results[0].timeline):
        cells = []
        for r in results:
            _, replicas, ready, backlog = r.timeline[i]
            cells.append(f"{f'{replicas:>2} ({ready:>2}) / {fmt_n(backlog):>5}':>18}")
        lines.append("   " + f"{fmt_s(now):>6}  " + "  ".join(cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scaledobject", type=Path, default=SCALED_OBJECT)
    parser.add_argument("--throughput", type=float, default=8.0,
                        help="images/s one warm worker finishes (default 8)")
    parser.add_argument("--startup-s", type=int, default=210,
                        help="pod creation to first image: GPU node ~90 s, image pull ~45 s, "
                             "model load + warm-up ~75 s (default 210)")
    parser.add_argument("--job-images", type=int, default=32,
                        help="images per CaptionJob (enqueue/backfill --batch-size, default 32)")
    parser.add_argument("--metric-lag-s", type=int, default=30,
                        help="age of the metric KEDA reads: one scrape + one rule evaluation")
    parser.add_argument("--drain-goal-s", type=float, default=120,
                        help="seconds a full backlog should take to drain (advice line)")
    parser.add_argument("--thresholds", help="backlog thresholds to compare, comma list "
                                             "(default: the YAML's x0.5, x1, x2)")
    parser.add_argument("--cooldowns", default="300,600,1800",
                        help="cooldownPeriod values for the sparse-uploads trade-off")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="run only this scenario (repeatable)")
    parser.add_argument("--timeline-every-s", type=int, default=300)
    parser.add_argument("--no-timeline", action="store_true", help="summary tables only")
    args = parser.parse_args(argv)

    scaling = load_scaling(args.scaledobject)
    thresholds = ([float(x) for x in args.thresholds.split(",")] if args.thresholds
                  else [scaling.threshold / 2, scaling.threshold, scaling.threshold * 2])
    run = dict(throughput=args.throughput, startup_s=args.startup_s,
               metric_lag_s=args.metric_lag_s, job_images=args.job_images,
               timeline_every_s=args.timeline_every_s)

    print(f"{args.scaledobject}:")
    print(f"  replicas {scaling.min_replicas}..{scaling.max_replicas}, polling "
          f"{scaling.polling_s}s, cooldown {scaling.cooldown_s}s")
    for t in scaling.triggers:
        what = ("captioner:images_backlog" if t.signal == "backlog"
                else f"images finished/s over {t.window_s}s")
        print(f"  trigger {what}: AverageValue {t.threshold:g} per worker, "
              f"active above {t.activation:g}")
    print(f"  scaleUp {scaling.up.describe()}; scaleDown {scaling.down.describe()}")
    advice = args.throughput * args.drain_goal_s
    print(f"  worker {args.throughput:g} images/s, {args.startup_s}s to start, jobs of "
          f"{args.job_images} images; metric lag {args.metric_lag_s}s")
    print(f"  backlog threshold for a {args.drain_goal_s:g}s drain goal: "
          f"{args.throughput:g} x {args.drain_goal_s:g} = {advice:.0f} images per worker")
    print("  rt/bulk p50/p99: wait from arrival to done; last done: when the last image "
          "finished; left: unfinished at the end;\n  GPU-h: pod lifetime incl. start-up; "
          f"events: replica changes; flips: HPA reversals within {FLAP_WINDOW_S}s\n")

    for name in args.scenario or list(SCENARIOS):
        scenario = SCENARIOS[name]()
        results = [simulate(SCENARIOS[name](), scaling.with_threshold(th), f"{th:g}", **run)
                   for th in thresholds]
        print(f"== {name}: {scenario.about} ({fmt_n(results[0].images)} images, "
              f"{fmt_s(scenario.duration_s)} simulated)")
        print("\n".join(summary_table(results, "threshold")))
        if not args.no_timeline:
            print("\n".join(timeline_table(results)))
        print()

    if not args.scenario or "sparse-uploads" in args.scenario:
        variants = [(f"cool {c}s", dataclasses.replace(scaling, cooldown_s=int(c)))
                    for c in args.cooldowns.split(",")]
        variants.append(("min 1 warm", dataclasses.replace(scaling, min_replicas=1)))
        results = []
        for label, variant in variants:
            scenario = SCENARIOS["sparse-uploads"]()
            scenario.warm_replicas = variant.min_replicas
            results.append(simulate(scenario, variant, label, **run))
        print("== cooldownPeriod trade-off, sparse-uploads (scale to zero vs. keep one warm)")
        print("\n".join(summary_table(results, "variant")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
