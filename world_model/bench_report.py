"""The markdown of ``python -m world_model.bench``: the dated results section appended to
docs/benchmarks.md (one table row per variant, plus producers and the scaling sweep when run).
"""
from __future__ import annotations

from typing import Any

from world_model.bench_world import STAGES


# ----------------------------------------------------------------------------- markdown
def _photon(p: dict[str, Any]) -> str:
    return (f"{p['first_effect_frames']} / {p['own_control_frames']} / {p['full_effect_frames']} "
            f"({p['own_control_ms']})")


def markdown(res: dict[str, Any]) -> str:
    """A dated results section for docs/benchmarks.md (one table row per variant)."""
    m, mod = res["machine"], res["model"]
    out = [f"\n### {res['date']} · {m['cpu']} · {m['threads']} threads · torch {m['torch']} · "
           f"{res['accel']['device']}\n",
           f"Model: {mod['source']} ({mod['params_m']} M params, {mod['tokens_per_frame']} tokens/frame, "
           f"{mod['dtype']}). Renderer: {res['renderer']}. Peak fp32 matmul: {res['peak_gflops']['used']} "
           f"GFLOP/s. {res['frames']} timed frames after {res['warmup']} warm-up.\n",
           "| variant | fps gen | fps pipe | p50 ms | p95 ms | p99 ms | fwd ms | rerun ms | other ms | decode ms "
           "| present ms | input ms | fwd/frame | GFLOP/frame | MFU fwd | input→photon frames first / own / full "
           "(ms own) |", "|" + "---|" * 16]
    for name, s in res["samplers"].items():
        st, lat = s["stages_ms"], s["latency_ms"]
        cells = [name, s["fps_generated"], s["fps_pipeline"], lat["p50"], lat["p95"], lat["p99"]]
        cells += [st[k]["mean"] for k in STAGES[1:]] + [st["input"]["mean"], s["forwards_per_frame"],
                                                        s["flops"]["dit_gflop_per_frame"], s["flops"]["mfu_forward"],
                                                        _photon(s["input_to_photon"])]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    c, mem = res["classic"], res["memory"]
    out.append(f"\nClassic game floor: {c['game_ms']['p50']} ms/frame (game), {c['latency_ms']['p50']} ms "
               f"(pipeline). Peak RSS {mem['peak_rss_mb']} MB; RSS growth over the timed stream "
               f"{mem['growth_mb']} MB.")
    for name, f in res["fold_rerun"].items():
        out.append(f"fold_rerun {name}: off/on = {f['off_over_on']} ({f['forwards_per_frame_off']} vs "
                   f"{f['forwards_per_frame_on']} forwards per frame).")
    pr = res.get("producers")
    if pr:
        out += [f"\nProducers (the engine's ThreadedProducer / PipelinedProducer, frames pulled flat out, "
                f"{pr['blocks']} alternating blocks of {pr['frames_per_block']} frames; pipelined / sequential "
                f"= {pr['pipelined_over_sequential_fps']}):\n",
                "| producer | fps gen | interval p50 / p95 / p99 ms | submit→frame p50 / p95 ms | MFU frame "
                "| fps per block |", "|" + "---|" * 6]
        for name in ("sequential", "pipelined"):
            v = pr[name]
            iv, lt = v["interval_ms"], v["submit_to_frame_ms"]
            out.append(f"| {name} | {v['fps_generated']} | {iv['p50']} / {iv['p95']} / {iv['p99']} "
                       f"| {lt['p50']} / {lt['p95']} | {v.get('mfu_frame', 'n/a')} | {v['block_fps']} |")
    sc = res.get("scaling")
    if sc:
        out += [f"\nScaling (random init, base {sc['base']}): {sc['verdict']}.\n",
                "| axis | value | tokens/frame | past frames | ms p50 | fwd ms | decode ms | GFLOP/frame |",
                "|" + "---|" * 8]
        for axis, a in sc["axes"].items():
            for p in a["points"]:
                out.append(f"| {axis} | {p[axis]} | {p['tokens_per_frame']} | {p['past_frames']} | {p['ms_p50']} "
                           f"| {p['stages_ms']['window_forward']} | {p['stages_ms']['decode']} "
                           f"| {p['gflop_per_frame']} |")
    return "\n".join(out) + "\n"
