"""``agentperf predict``: the capacity per SLO tier a (calibrated) profile predicts, from the virtual clock.

It is the ground-truth search (:mod:`agentperf_users.search.truth`, the same options, the same search) with a
planner's output: one line per tier instead of the truth's JSON (``--json`` gives that). Questions a
measured search would need hours of held hardware for become one command each: another ``--slo``,
another ``--trajectories`` set, another ``--max-num-seqs`` in the profile, ``--replicas N`` copies of the
server behind a ``--router`` (:mod:`agentperf_users.simulator.fleet`). Agents per accelerator count every
replica's accelerators (the profile's GPU count times N).

Why ``--repeats``: one search on the virtual clock is one draw of which agents' turns meet. A tier judged
on each agent's slowest request turns on single coincidences (a 16-token reply decoding while another
agent's 2K-token prefill runs), so the same twin searched at seeds 0-7 answers 3-8 agents on the real
vLLM's long set (benchmarks/twin_accuracy.py (b)), and the measured search is one more draw. The searches
at ``--seed``, ``--seed`` + 1, ... give the answer's median (the prediction) and range (where a measured
search may land), as the live report states its own rerun spread.

Why the verdict band (``--band``, on by default): a search answers one count, but where the verdicts flip
(a count passes above one that fails) any count in the flip is as true, and a measured search may stop
anywhere in it; the band says how sharp the knee is before anyone holds the server for it.

Why ``--speed-spread``: the seeds draw the workload, not the server. A measured server's speed moves between
two measurements of one count (+16 % to +31 % on the shared machine's vLLM, benchmarks/engine_capacity.py's
rechecks), so three of four measured searches fell under a range the seeds alone gave. With a spread S the
searches run on the profile's server slowed or sped by factors at evenly spaced quantiles of a lognormal of
sigma S (``exp(S * z)``, the middle one 1), so the range covers where a measured search may land on a server
that drifts that much; ``agentperf calibrate --from-run`` says what a run's rechecks measured.
"""

from __future__ import annotations

import argparse
import json
import math
from argparse import Namespace
from dataclasses import dataclass

from agentperf_users.errors import AgentperfError
from agentperf_users.measure.slo import SloSpec
from agentperf_users.options import MAX_REPEATS, MAX_SPEED_SPREAD
from agentperf_users.search.headline import band_words, capacity_words, range_words
from agentperf_users.search.policy import TierCapacity
from agentperf_users.search.predicted import (
    answer_count,
    answer_range,
    check_speed_spread,
    median_capacity,
    repeat_seeds,
    speed_factors,
)
from agentperf_users.search.truth import TruthInputs, TruthResult, VerdictBand, add_arguments, capacity_from_args


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="capacity per SLO tier predicted from a (calibrated) simulator profile",
        description="Run the capacity search on the simulator's engine with a virtual clock (as agentperf truth "
                    "does) and print the predicted capacity per SLO tier. Calibrate the profile from a real server "
                    "with agentperf calibrate.")
    add_arguments(parser, profile_default=None)
    parser.add_argument("--repeats", default="1", metavar="N",
                        help="searches at seeds --seed, --seed + 1, ...: the answer per tier is their median, with "
                             "their range (default 1: the one search agentperf truth runs)")
    parser.add_argument("--speed-spread", default="0", metavar="S",
                        help="with --repeats: how much the server's speed moves between measurements (the sigma of "
                             "its log, e.g. 0.1 for about ±10 %%); each search runs on the profile slowed or sped by "
                             "a factor at evenly spaced quantiles, so the range includes that drift (default 0)")
    parser.add_argument("--band", default=True, action=argparse.BooleanOptionalAction,
                        help="also judge every count from 1 to a fifth past the highest first failing count, at "
                             "--seed on the profile as given, and print each tier's verdict band: where the "
                             "verdicts flip, any capacity between is as true as the answer (--no-band: the "
                             "searches alone; the band costs one to three searches' time)")
    parser.add_argument("--json", action="store_true", help="print the search's JSON (as agentperf truth does)")
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class Repeated:
    """The searches of one prediction, one per seed, and per tier the median one's capacity and the range."""

    seeds: tuple[int, ...]
    results: tuple[TruthResult, ...]
    factors: tuple[float, ...] = ()  # each search's server this many times as slow as the profile's (--speed-spread)

    def capacities(self, tier: str) -> list[TierCapacity]:
        return [result.capacity[tier] for result in self.results]

    def agents(self, tier: str) -> list[int]:
        """Each search's answer for ``tier`` in seed order (none passed: 0; never failed: the count reached)."""
        return [answer_count(capacity) for capacity in self.capacities(tier)]

    def median(self, tier: str) -> TierCapacity:
        return median_capacity(self.capacities(tier))

    def to_dict(self, spec: SloSpec) -> dict:
        first = self.results[0].to_dict(spec)
        if len(self.results) == 1:
            return first
        return {**first,  # steps (and fleet): the first search's, at --seed
                "capacity": {name: {**self.median(name).to_dict(), "label": spec.tier(name).label,
                                    "range": list(answer_range(self.capacities(name)))}
                             for name in self.results[0].capacity},
                "repeats": {"seeds": list(self.seeds), "speed_factors": [round(f, 4) for f in self.factors],
                            "agents": {name: self.agents(name) for name in self.results[0].capacity}},
                "simulated_s": round(sum(r.simulated_s for r in self.results), 3),
                "wall_s": round(sum(r.wall_s for r in self.results), 3)}


def predict_repeated(args: Namespace) -> tuple[SloSpec, Repeated]:
    """``capacity_from_args`` at each of ``--repeats`` seeds from ``--seed`` on (:func:`repeat_seeds`), each
    on a server slowed by its :func:`speed_factors` (``--speed-spread``)."""
    text = str(args.repeats).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_REPEATS:
        raise AgentperfError(f"--repeats: expected a whole number from 1 to {MAX_REPEATS}, got {args.repeats!r}")
    spread = _speed_spread(args.speed_spread, int(text))
    seeds = repeat_seeds(args.seed, int(text))
    factors = speed_factors(spread, len(seeds))
    runs = [capacity_from_args(Namespace(**{**vars(args), "seed": seed}), slower=factor)
            for seed, factor in zip(seeds, factors)]
    return runs[0][0], Repeated(seeds, tuple(result for _, result in runs), factors if spread else ())


def _speed_spread(value: object, searches: int) -> float:
    try:
        spread = float(str(value).strip())
    except ValueError:
        spread = math.nan
    if not 0 <= spread <= MAX_SPEED_SPREAD:
        raise AgentperfError(f"--speed-spread: expected a number from 0 to {MAX_SPEED_SPREAD:g} (the sigma of the "
                             f"server's log speed, e.g. 0.1), got {value!r}")
    return check_speed_spread(spread, searches, ("--speed-spread", "--repeats"))


BAND_PAST_FAILING = 1.2
"""How far past the highest first failing count the band judges every count: a pass above a tier's first
failure (verdicts that flip) shows only where counts above it are judged."""


def bands(args: Namespace, repeated: Repeated) -> dict[str, VerdictBand]:
    """Each tier's verdict band at ``--seed`` on the profile as given (``truth.verdict_bands``), judged up to
    :data:`BAND_PAST_FAILING` times the highest first failing count the searches' median answers have (at
    most --max-agents), for the tiers whose median answer failed somewhere (one that never failed has no
    knee in the band)."""
    failing = {name: capacity.first_failing_agents for name in repeated.results[0].capacity
               if (capacity := repeated.median(name)).first_failing_agents}
    if not failing:
        return {}
    inputs = TruthInputs.from_args(args)
    judged = inputs.bands(min(inputs.params.max_agents, math.ceil(BAND_PAST_FAILING * max(failing.values()))))
    return {name: band for name, band in judged.items() if name in failing}


def capacity_line(label: str, capacity: TierCapacity, accelerators: int | None = None) -> str:
    line = f"{label:<28} {capacity_words(capacity.to_dict())}"
    if accelerators and capacity.agents:
        line += f", {capacity.agents / accelerators:.2f} per accelerator"
    return line


def run(args) -> int:
    spec, repeated = predict_repeated(args)
    band = bands(args, repeated) if args.band else {}
    if args.json:
        print(json.dumps({**repeated.to_dict(spec), **({"bands": {name: b.to_dict() for name, b in band.items()}}
                                                          if args.band else {})}, indent=2))
        return 0
    first = repeated.results[0]
    fleet = first.fleet
    served = (f"{len(fleet.replicas)} replicas of {args.profile} behind {fleet.router} ({fleet.accelerators} "
              "accelerators)" if fleet else str(args.profile))
    steps = sum(len(result.steps) for result in repeated.results)
    drift = (f" on servers {min(repeated.factors):.2f}-{max(repeated.factors):.2f}x as slow" if repeated.factors else "")
    searches = "" if len(repeated.seeds) == 1 else (f"; {len(repeated.seeds)} searches at seeds "
                                                     f"{repeated.seeds[0]}-{repeated.seeds[-1]}{drift}, their median")
    print(f"predicted capacity of {served} ({steps} load steps, "
          f"{sum(r.simulated_s for r in repeated.results):,.0f} s simulated in "
          f"{sum(r.wall_s for r in repeated.results):.1f} s{searches}):")
    for name in first.capacity:
        line = capacity_line(spec.tier(name).label, repeated.median(name), fleet.accelerators if fleet else None)
        if name in band:  # at --seed: the median may be another seed's search
            line += f"; {'' if len(repeated.seeds) == 1 else f'at seed {args.seed}, '}{band_words(band[name].to_dict())}"
        if len(repeated.seeds) > 1:
            line += f"; the {range_words(*answer_range(repeated.capacities(name)))}"
        print(line)
    if fleet:
        print("prefix cache hit ratio per replica (over the search): "
              + ", ".join(f"{stats.hit_ratio:.1%} of {stats.routed} requests" for stats in fleet.replicas))
    return 0
