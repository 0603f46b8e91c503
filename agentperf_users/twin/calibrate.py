"""``agentperf calibrate``: probe a server, fit the simulator's step constants, write a profile YAML.

Steps: ask the server what it serves and its limits (``/v1/models``'s ``max_model_len``; on ``/metrics``,
vLLM's ``vllm:cache_config_info`` for the KV cache's blocks and block size, SGLang's KV pool, running-request
limit and context, :mod:`agentperf_users.twin.server_limits`; ``max_num_seqs`` neither given nor stated
measured by a burst against ``/metrics``' queue gauges, :mod:`agentperf_users.twin.probe_seqs`; options
for what no server tells: ``max_num_batched_tokens``); send the probe
(:mod:`agentperf_users.twin.probe_run`); fit (:mod:`agentperf_users.twin.fit`); write the profile
(:mod:`agentperf_users.twin.profile_yaml`, checked by the simulator's own loader and renamed into place)
with a comment block saying where every number came from, and beside it ``NAME.probe.json`` with each
probe timing, its prediction and residual. Any failure (unreachable server, not OpenAI-compatible, a
probe that cannot be fitted) is one line and exit 2, with no profile written.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from agentperf_users.client.chat import redact_url
from agentperf_users.errors import AgentperfError
from agentperf_users.files import CONTEXT_FILE, atomic_write, read_json_object
from agentperf_users.loadgen.probe import ProbeTarget, served_models
from agentperf_users.options import Group, add_options
from agentperf_users.simulator.profile import SimulatorError
from agentperf_users.twin.fit import MAX_RMS_RELATIVE, FitResult, FrontEndFit, Observation, fit, fit_front_end
from agentperf_users.twin.from_run import RunPoints, describe, read_run_points, recheck_drift, refine
from agentperf_users.twin.probe_design import DESIGNS
from agentperf_users.twin.probe_run import ProbeClient, ProbeData, run_probe
from agentperf_users.twin.probe_seqs import BURST_REQUESTS, measure_max_num_seqs
from agentperf_users.twin.profile_yaml import Limits, profile_data, write_profile
from agentperf_users.twin.server_limits import SGLANG_LIMITS, VLLM_CACHE_INFO, ToldLimits, read_told_limits

SIDECAR_SUFFIX = ".probe.json"
LIMIT_NAMES = ("kv_capacity_tokens", "max_context_tokens", "max_num_seqs", "max_num_batched_tokens")
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192  # what calibrate assumes where --max-num-batched-tokens is not given
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default (1024 on large GPUs): kept where a burst cannot tell the limit


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="fit a simulator profile to a measured server (the digital twin)",
        description="Send a short designed probe to an OpenAI-compatible streaming server, fit the simulator's "
                    "step-time constants to it and write a profile YAML that simulate, truth, predict and "
                    "capacity --profile accept.")
    parser.add_argument("--host", default="", help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--from-probe", type=Path, default=None, metavar="NAME.probe.json",
                        help="fit again the probe an earlier calibrate stored (no traffic), instead of --host")
    parser.add_argument("--from-run", type=Path, default=None, metavar="RUN_DIR",
                        help="fit the timings of a finished agentperf capacity run's folder (no traffic); with "
                             "--from-probe, the probe's and the run's together (the probe's limits and token scale)")
    parser.add_argument("--max-residual", type=float, default=MAX_RMS_RELATIVE,
                        help="refuse a fit that misses the timings by more (root mean square of relative errors)")
    parser.add_argument("--out", required=True, type=Path, help="the profile YAML to write (NAME.probe.json goes beside it)")
    parser.add_argument("--design", choices=sorted(DESIGNS), default="standard",
                        help="the probe: standard (minutes on a slow server) or quick (seconds, coarser)")
    add_options(parser, [Group.AGENT])  # --model, --api-key-env, --request-timeout (--stall-timeout unused)
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help=f"the server's max_num_seqs. Not given: SGLang's sglang:max_running_requests where "
                             f"/metrics states it (vLLM does not), else measured by a burst of {BURST_REQUESTS} short "
                             "requests against /metrics' running and waiting gauges; where the burst never queues "
                             f"or the server has no such gauges, {DEFAULT_MAX_NUM_SEQS} (vLLM's default; 1024 on "
                             "large GPUs)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help=f"the server's token budget per step (chunked prefill size; vLLM logs it at start); "
                             f"not given: {DEFAULT_MAX_NUM_BATCHED_TOKENS}")
    parser.add_argument("--kv-cache-tokens", type=int, default=0,
                        help="the KV cache's size in tokens, where /metrics does not state it (vLLM's "
                             "vllm:cache_config_info, SGLang's sglang:max_total_num_tokens)")
    parser.add_argument("--max-model-len", type=int, default=0,
                        help="the context limit, where neither /v1/models nor /metrics (sglang:context_len) says it")
    parser.set_defaults(func=run)


def run(args) -> int:
    out: Path = args.out
    if not out.parent.is_dir():
        raise AgentperfError(f"--out {out}: no folder {out.parent}; expected a profile path in an existing folder")
    if not 0 < args.max_residual < 10:
        raise AgentperfError(f"--max-residual: expected a fraction such as 0.25, got {args.max_residual}")
    stored = _given_limits(_stored(args.from_probe), args) if args.from_probe else None
    if args.from_run:
        source = _from_run(args, stored)
    else:
        source = stored or _probed(args)
    source = _context_within_cache(source)
    observations = source.data.observations
    if args.from_run:  # a run's TTFTs may have queued, and are noisier: by what a first, lenient fit says
        observations = refine(observations, fit(observations, math.inf).constants)
    result = fit(observations, args.max_residual)
    scale = source.data.token_scale
    front_end = fit_front_end(source.data.agent_front_end_s)
    limits = source.limits
    ours = replace(limits, kv_capacity_tokens=int(limits.kv_capacity_tokens / scale),
                   max_context_tokens=int(limits.max_context_tokens / scale))
    try:
        profile = write_profile(out, profile_data(out.stem, result.constants.per_token_of(scale), ours,
                                                  front_end.per_token_of(scale) if front_end else None,
                                                  caches_prefixes(source.data)),
                                _header(source, result, out, front_end))
    except SimulatorError as exc:
        raise AgentperfError(f"the fitted numbers make no valid profile ({exc}): run calibrate again, or with the "
                             "standard --design") from None
    atomic_write(out.with_name(out.stem + SIDECAR_SUFFIX), json.dumps(_sidecar(source, result, front_end), indent=2) + "\n")
    _say(f"agentperf calibrate: wrote {out} (fit residual {result.rms_relative:.1%} RMS over "
         f"{len(result.fitted_residuals)} timings, {len(result.spikes)} spikes set aside; decode step at batch 1 {profile.decode_step_s(1) * 1e3:.2f} ms, "
         f"prefill {profile.prefill_tok_s():,.0f} tok/s, KV {profile.kv_capacity_tokens:,} tokens)")
    _say(f"agentperf calibrate: {_front_end_line(source.data, front_end)}")
    if source.run_note:
        _say(f"agentperf calibrate: {source.run_note}")
    drift = recheck_drift(args.from_run) if args.from_run else None
    if drift:
        _say(f"agentperf calibrate: {drift.words()}")
    return 0


def caches_prefixes(data: ProbeData) -> bool:
    """Whether the twin caches prompt prefixes: unless the probe's shared-prefix pair found the server does not
    (an agent's every turn then prefills its whole conversation); a probe that could not tell keeps the
    simulator's default, on."""
    return not data.prefix_caching.startswith("off")


def _context_within_cache(source: Source) -> Source:
    """``source`` with its context capped at its KV cache: a server may state a context longer than its cache
    holds (an SGLang pool smaller than its context_len; an option given), but no request runs past the
    cache, and a profile's context must fit it."""
    limits = source.limits
    if limits.max_context_tokens <= limits.kv_capacity_tokens:
        return source
    said = source.sources.get("max_context_tokens", "")
    return replace(source, limits=replace(limits, max_context_tokens=limits.kv_capacity_tokens),
                   sources={**source.sources, "max_context_tokens": f"{said} {limits.max_context_tokens}, capped at "
                            f"the KV cache's {limits.kv_capacity_tokens} tokens (no request holds more)"})


def _front_end_line(data: ProbeData, front_end: FrontEndFit | None) -> str:
    """What the profile's front-end cost is, and where it came from (or why it is 0)."""
    if front_end is None:
        why = data.front_end_note or (f"{len(data.agent_front_end_s)} agent-shaped timings, too few to fit a line"
                                      if data.agent_front_end_s else "no agent-shaped timings")
        return f"front-end cost per request 0 ({why})"
    return (f"front-end cost per request {front_end.fixed_s * 1e3:.1f} ms + {front_end.per_token_s * 1e6:.2f} ms per 1K "
            f"server prompt tokens (client TTFT minus the server's queue and prefill time, {len(front_end.points)} "
            f"agent-shaped requests, {len(front_end.spikes)} set aside, residual {front_end.rms_s * 1e3:.1f} ms RMS)"
            + (f"; {data.front_end_note}" if data.front_end_note else ""))


@dataclass(frozen=True)
class Source:
    """What the fit works from: a probe just sent, or one stored by an earlier calibrate (its sidecar)."""

    server: str  # the URL as shown (credentials removed)
    model: str
    design: str
    limits: Limits
    sources: dict[str, str]  # where each limit came from
    data: ProbeData
    run_note: str = ""  # what a run's points were, and what a run cannot measure (``--from-run``)


def _probed(args) -> Source:
    if not args.host:
        raise AgentperfError("calibrate needs --host URL (a server to probe) or --from-probe FILE (a stored probe)")
    _check_engine_options(args)
    target = ProbeTarget(args.host, api_key=os.environ.get(args.api_key_env) or None, model=args.model,
                         api_key_env=args.api_key_env, timeout_s=args.request_timeout)
    served = served_models(target)
    model = args.model or next(iter(served))
    if model not in served:
        raise AgentperfError(f"--model {model!r} is not served by {redact_url(args.host)}; it serves {', '.join(served)}")
    told = read_told_limits(args.host, target)
    limits, sources = _limits(args, served[model], told)
    client = ProbeClient(target, model)
    if args.max_num_seqs is None and told.get("max_num_seqs") is None:
        limits, sources = _measured_seqs(client, limits, sources)
    design = DESIGNS[args.design].fitted_to(limits.max_context_tokens, limits.kv_capacity_tokens, limits.max_num_seqs)
    _say(f"agentperf calibrate: probing {redact_url(args.host)} ({model}) with the {design.name} design")
    data = run_probe(client, design, limits.max_num_batched_tokens)
    return Source(redact_url(args.host), model, design.name, limits, sources, data)


def _measured_seqs(client: ProbeClient, limits: Limits, sources: dict[str, str]) -> tuple[Limits, dict[str, str]]:
    """``limits`` with the max_num_seqs a burst measured (:mod:`~agentperf_users.twin.probe_seqs`), or as they
    are where the burst cannot tell it; either way ``sources`` says what the burst showed."""
    _say("agentperf calibrate: measuring max_num_seqs (a burst of short requests, reading /metrics)")
    found = measure_max_num_seqs(client, limits.kv_capacity_tokens)
    if found.value is None:
        _say(f"agentperf calibrate: max_num_seqs {limits.max_num_seqs} kept ({found.note}); pass --max-num-seqs "
             "if the server's is another")
        return limits, {**sources, "max_num_seqs": f"vLLM's default, not measured ({found.note})"}
    _say(f"agentperf calibrate: max_num_seqs {found.value}: {found.note}")
    return replace(limits, max_num_seqs=found.value), {**sources, "max_num_seqs": found.note}


def _check_engine_options(args) -> None:
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise AgentperfError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")


def _stored(path: Path) -> Source:
    """The probe an earlier calibrate stored in its sidecar (``NAME.probe.json``), to fit again without traffic."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        limits = Limits(**{name: int(stored["limits"][name]) for name in LIMIT_NAMES})
        data = ProbeData(tuple(Observation.from_dict(o) for o in stored["observations"]), str(stored["prefix_caching"]),
                         float(stored["token_scale"]),
                         tuple((int(n), float(s)) for n, s in stored.get("front_end_s", ())),
                         tuple((int(n), float(s)) for n, s in stored.get("agent_front_end_s", ())),
                         str(stored.get("front_end_note", "")))
        return Source(str(stored["server"]), str(stored["model"]), str(stored["design"]), limits,
                      {name: str(stored["limit_sources"][name]) for name in LIMIT_NAMES}, data)
    except OSError as exc:
        raise AgentperfError(f"--from-probe {path}: cannot read it: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AgentperfError(f"--from-probe {path}: expected the NAME{SIDECAR_SUFFIX} file an agentperf calibrate wrote "
                             f"({type(exc).__name__}: {str(exc)[:80]})") from None


def _given_limits(source: Source, args) -> Source:
    """A stored probe with the limits given as options in place of its own: the same timings priced for the
    server as it is now set up (``--max-num-seqs 3`` on a server probed with vLLM's default), since none of
    the fitted constants depends on them. The header names the option, and what the probe had."""
    _check_engine_options(args)
    given = {"max_num_seqs": (args.max_num_seqs, "--max-num-seqs"),
             "max_num_batched_tokens": (args.max_num_batched_tokens, "--max-num-batched-tokens"),
             "kv_capacity_tokens": (args.kv_cache_tokens or None, "--kv-cache-tokens"),
             "max_context_tokens": (args.max_model_len or None, "--max-model-len")}
    changed = {name: value for name, (value, _) in given.items() if value is not None and value != getattr(source.limits, name)}
    if not changed:
        return source
    sources = {**source.sources, **{name: f"{given[name][1]} (the probe's {getattr(source.limits, name)} "
                                          f"from {source.sources[name]})" for name in changed}}
    return replace(source, limits=replace(source.limits, **changed), sources=sources)


def _from_run(args, probe: Source | None) -> Source:
    """The points of a finished run (``twin.from_run``), after a stored probe's when one is given; limits a run
    cannot measure come from the probe, else from the options (KV cache size and context limit required)."""
    folder: Path = args.from_run
    _check_engine_options(args)
    limits = probe.limits if probe is not None else None
    seqs = args.max_num_seqs or DEFAULT_MAX_NUM_SEQS
    points = read_run_points(folder, limits.max_num_batched_tokens if limits else _batched_tokens(args),
                             limits.max_num_seqs if limits else seqs)
    if probe is not None:
        limits, sources = probe.limits, dict(probe.sources)
    else:
        if args.kv_cache_tokens < 1 or args.max_model_len < 1:
            raise AgentperfError(f"--from-run {folder}: a run does not measure the KV cache's size or the context "
                                 "limit: pass --kv-cache-tokens and --max-model-len (or --from-probe with a probe's)")
        limits = Limits(args.kv_cache_tokens, args.max_model_len, seqs, _batched_tokens(args))
        sources = {"kv_capacity_tokens": "--kv-cache-tokens", "max_context_tokens": "--max-model-len",
                   "max_num_seqs": _seqs_source(args),
                   "max_num_batched_tokens": _batched_source(args)}
    target = _run_target(folder)
    base = probe.data if probe is not None else ProbeData((), points.prefix_caching(), points.token_scale or 1.0)
    data = replace(base, observations=base.observations + points.observations)
    unmeasured = ", ".join(f"{name} from {sources[name]}" for name in LIMIT_NAMES)
    note = (f"fitted {'the probe and ' if probe else ''}the run {folder}: {describe(points)}. Not measured by a run "
            f"(kept): {unmeasured}" + ("" if probe else f"; {_run_scale_words(points)}"))
    return Source(probe.server if probe else redact_url(target["host"]) if target.get("host") else f"run {folder}",
                  probe.model if probe else target.get("model") or "unknown",
                  f"{probe.design} + run" if probe else "run", limits, sources, data, note)


def _run_scale_words(points: RunPoints) -> str:
    """Where a run-only profile's token scale came from (the probe's, when there is one, is said in its header)."""
    if points.token_scale is None:
        return ("token scale 1: the records carry no agentperf count of their prompts (a run from before it was "
                "kept), so the profile is priced per server token")
    return (f"token scale {points.token_scale:.3f} server tokens per agentperf token, from {points.scale_requests} "
            "requests' two counts of their prompts")


def _run_target(folder: Path) -> dict:
    """The run's target (host, model) from its ``run.json`` where it has one (nothing otherwise)."""
    try:
        saved = read_json_object(folder / CONTEXT_FILE, missing_ok=True) or {}
        target = saved.get("context", {}).get("target", {})
        return {key: str(value) for key, value in target.items() if value} if isinstance(target, dict) else {}
    except AgentperfError:
        return {}


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _limits(args, max_model_len: int | None, told: ToldLimits) -> tuple[Limits, dict[str, str]]:
    """The server's limits and where each came from: an option given, else what the server states
    (``/v1/models``' max_model_len; ``/metrics``, :mod:`~agentperf_users.twin.server_limits`); max_num_seqs
    neither given nor stated is measured after (``_measured_seqs``)."""
    sources = {"max_num_batched_tokens": _batched_source(args)}
    context = max_model_len or told.get("max_context_tokens") or args.max_model_len
    if not context:
        raise AgentperfError(f"{redact_url(args.host)}/v1/models does not say max_model_len: pass --max-model-len")
    sources["max_context_tokens"] = ("/v1/models max_model_len" if max_model_len else
                                     told.sources.get("max_context_tokens") or "--max-model-len")
    if args.kv_cache_tokens > 0:
        kv_tokens, sources["kv_capacity_tokens"] = args.kv_cache_tokens, "--kv-cache-tokens"
    elif told.get("kv_capacity_tokens"):
        kv_tokens, sources["kv_capacity_tokens"] = told.get("kv_capacity_tokens"), told.sources["kv_capacity_tokens"]
    else:
        raise AgentperfError(f"{redact_url(args.host)}/metrics states no KV cache size (vLLM's {VLLM_CACHE_INFO}, "
                             f"SGLang's {SGLANG_LIMITS['kv_capacity_tokens']}): pass it as --kv-cache-tokens")
    seqs = args.max_num_seqs or told.get("max_num_seqs")
    sources["max_num_seqs"] = _seqs_source(args) if args.max_num_seqs or not seqs else told.sources["max_num_seqs"]
    return Limits(kv_tokens, context, seqs or DEFAULT_MAX_NUM_SEQS, _batched_tokens(args)), sources


def _batched_tokens(args) -> int:
    return args.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS


def _batched_source(args) -> str:
    return ("--max-num-batched-tokens (not reported by servers)" if args.max_num_batched_tokens
            else f"calibrate's default {DEFAULT_MAX_NUM_BATCHED_TOKENS} (--max-num-batched-tokens not given; servers do not report it)")


def _seqs_source(args) -> str:
    return "--max-num-seqs" if args.max_num_seqs else "vLLM's default (--max-num-seqs not given)"


def _header(source: Source, result: FitResult, out: Path, front_end: FrontEndFit | None) -> str:
    limits, sources, data = source.limits, source.sources, source.data
    c = result.constants
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Calibrated by `agentperf calibrate {_how(source)}` from {source.server} (model {source.model}), "
        f"fitted {when}.",
        "Step constants fitted (the simulator's roofline, agentperf_users/twin/fit.py):",
        f"  overhead per step {c.overhead_s * 1e3:.4g} ms; memory-bound: weights {c.weights_s * 1e3:.4g} ms + "
        f"{c.kv_s_per_token * 1e9:.4g} ns per KV token read;",
        f"  compute-bound: {c.compute_s_per_token * 1e6:.4g} us per token + {c.attention_s_per_pair * 1e12:.4g} ps per "
        f"attention pair; per decoding sequence {c.sequence_s * 1e3:.4g} ms; request latency outside steps "
        f"{c.request_latency_s * 1e3:.4g} ms (not in this profile).",
        f"Fit: {len(result.relative_residuals) - len(result.spikes)} timings, residual {result.rms_relative:.1%} RMS, "
        f"{result.max_relative:.1%} max; {len(result.spikes)} set aside as spikes (much slower than the fit); "
        f"every timing and its residual: {out.stem}{SIDECAR_SUFFIX}",
        "Limits: " + "; ".join(f"{name} {getattr(limits, name)} from {sources[name]}" for name in LIMIT_NAMES),
        f"Prefix caching on the server: {data.prefix_caching} (so engine.enable_prefix_caching "
        f"{str(caches_prefixes(data)).lower()}{'' if data.prefix_caching != 'unknown' else ': the default'}).",
        f"Token scale: the server counts {data.token_scale:.4g} tokens per agentperf token; the constants and limits "
        "above are per server token, the profile's are per agentperf token (the simulator's count).",
        *([f"From a run: {source.run_note}."] if source.run_note else []),
        *(["Outside the engine's steps (client TTFT minus its prefill time; not in this profile): "
           + ", ".join(f"{s * 1e3:.1f} ms at {n} tokens" for n, s in data.front_end_s[::3])] if data.front_end_s else []),
        f"Agent-shaped requests (tools, conversations, cold and cached): {_front_end_line(data, front_end)}; in this "
        "profile as efficiency.frontend_ms and frontend_ms_per_1k_tokens (per agentperf token).",
        "The gpu and model fields are a stand-in that gives these constants (twin/profile_yaml.py); power is a placeholder.",
    ]
    return "\n".join(lines)


def _how(source: Source) -> str:
    if source.design == "run":
        return "--from-run"
    return f"--design {source.design.removesuffix(' + run')}" + (" --from-run" if source.run_note else "")


def _sidecar(source: Source, result: FitResult, front_end: FrontEndFit | None) -> dict:
    c, data, limits = result.constants, source.data, source.limits
    return {
        "server": source.server, "model": source.model, "design": source.design, "prefix_caching": data.prefix_caching,
        "token_scale": data.token_scale, "front_end_s": [list(pair) for pair in data.front_end_s],
        "agent_front_end_s": [list(pair) for pair in data.agent_front_end_s], "front_end_note": data.front_end_note,
        "front_end": ({"fixed_s": front_end.fixed_s, "per_server_token_s": front_end.per_token_s, "rms_s": front_end.rms_s,
                       "spikes": sorted(front_end.spikes)} if front_end else None),
        "limits": {name: getattr(limits, name) for name in LIMIT_NAMES}, "limit_sources": source.sources,
        "constants": c.to_dict(),
        "fit": {"rms_relative": result.rms_relative, "max_relative": result.max_relative,
                "memory_bound_steps": result.memory_bound_steps, "compute_bound_steps": result.compute_bound_steps},
        "observations": [{**obs.to_dict(), "predicted_s": c.predict_s(obs), "relative_residual": residual,
                          "spike": index in result.spikes}
                         for index, (obs, residual) in enumerate(zip(result.observations, result.relative_residuals))],
    }
