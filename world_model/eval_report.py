"""Rendering of an evaluation report (the dict eval.json holds): eval.md tables and PNG plots.

Both take the JSON-clean report (``None`` where a value is undefined) and also render reports
written before a key existed (``psnr_pooled``, ...): a missing value prints ``n/a``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _f(v: Any, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(_f(v) for v in r) + " |" for r in rows] + [""]


def _minus(a: Any, b: Any) -> Any:
    return None if a is None or b is None else a - b


def _delta_drift_cells(v: dict[str, Any]) -> list[Any]:
    """ΔDrift, ΔDrift %, ΔDrift real: undefined with a single bin (first = last), said so."""
    if len(v["quality"]) < 2:
        return ["n/a (one bin)"] * 3
    return [v["delta_drift"], v["delta_drift_pct"], v["delta_drift_real"]]


def _tf_section(tf: dict[str, Any]) -> list[str]:
    cl, cc = tf["copy_last"], tf["codec_ceiling"]
    rows = [["copy-last", cl["psnr"], cl.get("psnr_pooled"), cl["ssim"], 0.0, 0.0],
            ["codec ceiling", cc["psnr"], cc.get("psnr_pooled"), cc["ssim"], _minus(cc["psnr"], cl["psnr"]),
             _minus(cc.get("psnr_pooled"), cl.get("psnr_pooled"))]]
    rows += [[n, v["psnr"], v.get("psnr_pooled"), v["ssim"], v["gain_over_copy_last_db"],
              v.get("gain_over_copy_last_db_pooled")] for n, v in tf["configs"].items()]
    return (["## Teacher-forced next frame", "",
             (f"{tf['positions']} positions. PSNR: mean of per-frame PSNR and pooled (of the MSE over all "
              "frames, as training validation); gains over copy-last in both."), ""]
            + _table(["", "PSNR mean dB", "PSNR pooled dB", "SSIM", "gain over copy-last mean dB",
                      "gain over copy-last pooled dB"], rows) + _tf_by_action(tf))


def _tf_by_action(tf: dict[str, Any]) -> list[str]:
    rows = [[n, g, a["positions"], a["psnr_pooled"], a["copy_last_pooled"], a["codec_ceiling_pooled"],
             a["gain_over_copy_last_db_pooled"], a["share_of_reachable"]]
            for n, v in tf["configs"].items() for g, a in (v.get("by_action") or {}).items()]
    if not rows:
        return []
    return (["By the action of the predicted frame (pooled PSNR). Share of reachable: the part of "
             "copy-last's error above the codec's that the dream removes (0 = no better than copying).", ""]
            + _table(["config", "action", "positions", "dream dB", "copy-last dB", "codec ceiling dB",
                      "gain dB", "share of reachable"], rows))


def _rollout_section(ro: dict[str, Any]) -> list[str]:
    hs = [str(h) for h in ro["horizons"]]
    pooled = ro.get("psnr_pooled") or {}
    cells = lambda mean, pool: [x for h in hs for x in ((mean or {}).get(h), (pool or {}).get(h))]
    rows = [["copy-last", *cells(ro["copy_last"], pooled.get("copy_last"))],
            ["codec ceiling", *cells(ro["codec_ceiling"], pooled.get("codec_ceiling"))]]
    rows += [[n, *cells(v["psnr"], v.get("psnr_pooled"))] for n, v in ro["configs"].items()]
    return (["## Rollout PSNR (dB) by horizon", "",
             f"{ro['positions']} starts. Per horizon h: mean of per-frame PSNR, pooled PSNR.", ""]
            + _table(["", *[f"{h} {kind}" for h in hs for kind in ("mean", "pooled")]], rows))


def _onset_section(on: dict[str, Any] | None) -> list[str]:
    """Dreams from turn onsets, recorded vs mirrored turn (reports before session 8 have none)."""
    if not on:
        return []
    head = ["## Response to a turn (dreams from real turn onsets)", "",
            (f"{on['positions']} onsets (the previous frame did not turn, the next {on['horizon']} do). Pooled "
             "PSNR of frame h after the onset under the recorded turn and under the mirrored turn; response = "
             f"recorded - mirrored (0 = the command is ignored); first frame with response >= "
             f"{_f(on['margin_db'])} dB."), ""]
    if not on["positions"]:
        return head + ["No turn onsets in these sessions.", ""]
    hs = [str(h) for h in range(1, on["horizon"] + 1)]
    get = lambda d, h: (d or {}).get(h, (d or {}).get(int(h)))   # keys are str in eval.json, int before
    rows = [[label, *[get(on[key], h) for h in hs], *["-"] * len(hs), "-"]
            for label, key in (("copy-last", "copy_last"), ("codec ceiling", "codec_ceiling"))]
    late = f"> {on['horizon']}"                                   # no response within the horizon
    rows += [[n, *[get(v["recorded"], h) for h in hs], *[get(v["response_db"], h) for h in hs],
              late if v["first_response_frame"] is None else v["first_response_frame"]]
             for n, v in on["configs"].items()]
    return head + _table(["", *[f"h={h} PSNR" for h in hs], *[f"h={h} response dB" for h in hs],
                          "first response frame"], rows)


def held_columns(horizon: int) -> list[int]:
    """The frames a held-turn table shows: 1, 2, 4, 8, 12, 16, ... up to the horizon, and the horizon."""
    cols = [h for h in (1, 2, 4, 8) if h <= horizon] + list(range(12, horizon + 1, 4))
    return cols if not horizon or cols[-1] == horizon else cols + [horizon]


def _held_section(ht: dict[str, Any] | None) -> list[str]:
    """Held turns: dreams of a turn held ``horizon`` frames from real onsets (reports before session 11 have none)."""
    if not ht or not ht["horizon"]:
        return []
    head = ["## Held turns (dreams from real turn onsets, the turn held)", "",
            (f"{ht['positions']} onsets whose turn lasts {ht['horizon']} frames. Pooled PSNR of frame h after the "
             "onset; share = the part of copy-last's error above the codec's that the dream removes "
             "(0 = a frozen picture, 1 = the codec's best)."), ""]
    if not ht["positions"]:
        return head + ["No held turns in these sessions.", ""]
    hs = [str(h) for h in held_columns(ht["horizon"])]
    get = lambda d, h: (d or {}).get(h, (d or {}).get(int(h)))
    base = [("copy-last", "copy_last"), ("codec ceiling", "codec_ceiling"), ("rotated-last", "rotated_last")]
    rows = [[label, *[get(ht[key], h) for h in hs], *["-"] * len(hs)] for label, key in base if key in ht]
    rows += [[n, *[get(v["psnr"], h) for h in hs], *[get(v["share_of_reachable"], h) for h in hs]]
             for n, v in ht["configs"].items()]
    out = head + _table(["", *[f"h={h} PSNR" for h in hs], *[f"h={h} share" for h in hs]], rows)
    if "visible_share" not in ht:                 # no camera (reports before session 12)
        return out
    out += [("The visible region: columns of frame h whose rays the frame before the onset already had "
             "(the rest is new to the view: no predictor can know it). Rotated-last = that frame turned "
             "by the recorded turn (geometry alone). PSNR over the visible region:"), ""]
    rows = [["visible share", *[get(ht["visible_share"], h) for h in hs]]]
    rows += [[label, *[get(ht[key + "_visible"], h) for h in hs]] for label, key in base]
    rows += [[n, *[get(v.get("psnr_visible"), h) for h in hs]] for n, v in ht["configs"].items()]
    return out + _table(["", *[f"h={h}" for h in hs]], rows)


def _drift_section(dr: dict[str, Any]) -> list[str]:
    lines = ["## Drift over long streams", "",
             (f"Bins of {dr['bin_seconds']} s at {dr['fps']} fps; seeds {dr['seeds']}. Quality: 0-100 "
              "(docs/evaluation.md); FD floor = the first bin's real (shadow) frames vs real frames of "
              "the same worlds along another explorer path; ΔDrift needs two bins."), ""]
    lines += _table(["config", "minutes", "quality first", "quality last", "ΔDrift", "ΔDrift %", "ΔDrift real",
                     "FD first", "FD last", "FD floor", "PSNR vs truth first mean", "PSNR vs truth first pooled",
                     "ms/frame"],
                    [[n, v["minutes"], v["quality"][0], v["quality"][-1], *_delta_drift_cells(v), v["fd"][0],
                      v["fd"][-1], v["fd_floor"][0], v["psnr_vs_truth"][0],
                      (v.get("psnr_vs_truth_pooled") or [None])[0], v["ms_per_frame"]]
                     for n, v in dr["configs"].items()])
    same = [f"{n} = {v['same_as']}" for n, v in dr["configs"].items() if v.get("same_as")]
    if same:
        lines += [(f"Configs with the same sampler settings as an earlier one, not streamed twice (seeded "
                   f"streams are identical): {', '.join(same)}."), ""]
    for key, title in (("quality", "Quality per bin"), ("fd", "Fréchet distance per bin"),
                       ("theme_retention", "Theme retention per bin (share of frames)")):
        n_bins = max(len(v[key]) for v in dr["configs"].values())
        real_key = {"quality": "quality_real", "fd": "fd_floor", "theme_retention": "theme_retention_real"}[key]
        first = next(iter(dr["configs"].values()))
        codec_key = {"quality": "quality_codec", "fd": "fd_codec", "theme_retention": "theme_retention_codec"}[key]
        codec_row = [["codec (real frames encoded + decoded)", *first[codec_key]]] if codec_key in first else []
        lines += [f"### {title}", ""] + _table(
            ["config", *[str(b) for b in range(n_bins)]],
            [["real" if key != "fd" else "floor", *first[real_key]]] + codec_row
            + [[n, *v[key]] for n, v in dr["configs"].items()])
    return lines


def markdown(r: dict[str, Any]) -> str:
    """eval.md: every section as a table, model rows beside their baselines."""
    lat, c = r["latency"], r["codec"]
    lines = [f"# Evaluation of checkpoint {r['checkpoint']['id']}", "",
             (f"Held-out seeds {r['seeds']} (recorded: {r['recorded_seeds']}); quick={r['quick']}. "
              "See docs/evaluation.md for definitions."), "",
             "## Codec ceiling", ""]
    lines += _table(["frames", "PSNR mean dB", "PSNR pooled dB", "SSIM"],
                    [[c["frames"], c["psnr"], c.get("psnr_pooled"), c["ssim"]]])
    lines += (_tf_section(r["teacher_forced"]) + _rollout_section(r["rollout"]) + _onset_section(r.get("onsets"))
              + _held_section(r.get("held_turns")))
    lines += _drift_section(r["drift"])
    lines += ["## Action faithfulness (inverse-dynamics model)", "",
              (f"Real held-out pairs: accuracy {_f(r['probes']['idm_acc_heldout'])} "
               f"({r['probes']['idm_pairs_heldout']} pairs); theme classifier on held-out frames: "
               f"{_f(r['probes']['theme_acc_heldout'])}."), ""]
    a0 = next(iter(r["action_faithfulness"]["configs"].values()), {})
    if "codec_balanced_acc" in a0:
        lines += [(f"The streams' real frames through the codec (the ceiling of any dream): accuracy "
                   f"{_f(a0['codec_acc'])}, balanced {_f(a0['codec_balanced_acc'])} (ratio to real "
                   f"{_f(a0['codec_balanced_ratio'])})."), ""]
    lines += _table(["config", "pairs", "acc dreamed", "acc real", "ratio", "balanced dreamed", "balanced real",
                     "balanced ratio"],
                    [[n, a["pairs"], a["acc"], a["real_acc"], a["ratio"], a["balanced_acc"], a["real_balanced_acc"],
                      a["balanced_ratio"]] for n, a in r["action_faithfulness"]["configs"].items()])
    cl = lat["classic"]
    lines += ["## Key-press latency (frames)", "",
              (f"Key {cl['key']} held from step {cl['press_tick']}; threshold {cl['threshold']} mean "
               f"|pixel diff|; watched {cl['horizon']} frames."), ""]
    lines += _table(["source", "late binding", "mean frames", "detected / seeds", "per seed"],
                    [["classic game", "-", cl["mean_frames"], f"{cl['detected']}/{cl['seeds']}", cl["per_seed"]]]
                    + [[n, v["late_binding"], v["mean_frames"], f"{v['detected']}/{v['seeds']}", v["per_seed"]]
                       for n, v in lat["configs"].items()])
    lines += ["## Time (s)", ""] + _table(list(r["timing_seconds"]), [list(r["timing_seconds"].values())])
    return "\n".join(lines)


def _nan(values: list[Any]) -> list[float]:
    return [np.nan if x is None else x for x in values]


def write_plots(r: dict[str, Any], out: Path) -> list[str]:
    """PNG plots: per-bin quality, FD, theme retention per config; rollout PSNR (mean, pooled) vs horizon."""
    import matplotlib
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    dr, ro, paths = r["drift"], r["rollout"], []
    minute = lambda n: [(b + 0.5) * dr["bin_seconds"] / 60.0 for b in range(n)]   # bin centres in minutes
    for key, real_key, ylabel in (("quality", "quality_real", "quality score (0-100)"),
                                  ("fd", "fd_floor", "Fréchet distance"),
                                  ("theme_retention", "theme_retention_real", "share of frames in start theme")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for n, v in dr["configs"].items():
            ax.plot(minute(len(v[key])), _nan(v[key]), marker="o", label=n)
        first = next(iter(dr["configs"].values()))
        ax.plot(minute(len(first[real_key])), _nan(first[real_key]),
                "k--", label="real" if key != "fd" else "real vs real, same worlds (floor)")
        ax.set_xlabel("stream time (minutes)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(str(out / f"drift_{key}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    hs = [str(h) for h in ro["horizons"]]
    pooled = ro.get("psnr_pooled") or {}
    for ax, title, of_config, baselines in (
            (axes[0], "mean of per-frame PSNR", lambda v: v["psnr"], ro),
            (axes[1], "pooled PSNR (MSE over frames)", lambda v: v.get("psnr_pooled") or {}, pooled)):
        for n, v in ro["configs"].items():
            ax.plot(ro["horizons"], _nan([of_config(v).get(h) for h in hs]), marker="o", label=n)
        for key, style in (("copy_last", "k--"), ("codec_ceiling", "k:")):
            if baselines.get(key):
                ax.plot(ro["horizons"], _nan([baselines[key].get(h) for h in hs]), style,
                        label=key.replace("_", " "))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ro["horizons"], hs)
        ax.set_xlabel("horizon (frames)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR (dB)")
    fig.tight_layout()
    paths.append(str(out / "rollout_psnr.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
