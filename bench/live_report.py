"""`bench live`'s outputs: live.json, a markdown table of live against simulated, and a plot of
mean latency and TTFT against the arrival rate (from the results dict of `bench.live.run`)."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(out: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "live.json").write_text(json.dumps(out, indent=1) + "\n")
    (out_dir / "live.md").write_text(markdown(out))
    plot(out["runs"], out_dir / "live_latency.png")


def markdown(out: dict) -> str:
    c = out["cost"]
    lines = [
        (f"Live vs simulated, model `{out['model']}`, {out['num_requests']} requests per run, "
         f"prompts <= {out['max_prompt']}, outputs <= {out['max_output']} tokens; last fitted cost model "
         f"d0={c['d0'] * 1e3:.1f} ms d_tok={c['d_tok'] * 1e6:.0f} us d_kv={c['d_kv'] * 1e9:.0f} ns, "
         f"KV {c['kv_capacity_tokens']} tokens (each row's own d0 in the table)."),
        "",
        ("| policy | rate (req/s) | load | live mean (s) | sim mean (s) | live p90 (s) | sim p90 (s) "
         "| live TTFT (s) | sim TTFT (s) | live tok/s | sim tok/s | done | sim d0 (ms) | cost model ± "
         "| speed check | predicted range (s) | sim error | steps vs calibration | replay mean (s) | replay error |"),
        ("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
         "| ---: | ---: | ---: | ---: | ---: |"),
    ]
    for r in out["runs"]:
        lv, sm = r["live"], r["sim"]
        lines.append(
            f"| {r['policy']} | {r['rate']:.3g} | {r['load']:.2f} | {lv['latency_mean_s']:.2f} | "
            f"{sm['latency_mean_s']:.2f} | {lv['latency_p90_s']:.2f} | {sm['latency_p90_s']:.2f} | "
            f"{lv['ttft_mean_s']:.2f} | {sm['ttft_mean_s']:.2f} | {lv['throughput_tok_s']:.1f} | "
            f"{sm['throughput_tok_s']:.1f} | {lv['completed']}/{lv['submitted']} | "
            f"{r['cost']['d0'] * 1e3:.0f} | {_uncertainty(r)} | {_speed(r)} | {_range(r)} | {r['sim_error']:.0%} | {_replay(r)}")
    return "\n".join(lines) + "\n"


def _replay(run: dict) -> str:
    if "replay" not in run:  # results written before the replay existed
        return "- | - | - |"
    return f"{run['drift']:+.0%} | {run['replay']['latency_mean_s']:.2f} | {run['replay_error']:.0%} |"


def _speed(run: dict) -> str:
    """The speed check before the run (results written before it existed, or none made: -)."""
    return "-" if run.get("speed_check") is None else f"{run['speed_check']:+.1%}"


def _range(run: dict) -> str:
    """The prediction at ±2 standard deviations of the box's speed (bold: live inside it)."""
    if "predicted_range_s" not in run:  # results written before the range existed
        return "-"
    low, high = run["predicted_range_s"]
    if low == high:  # no calibration measured the box's speed (a cost file was given)
        return "-"
    text = f"{low:.2f}-{high:.2f}"
    return f"**{text}**" if run["in_range"] else text


def _uncertainty(run: dict) -> str:
    """The calibration's bootstrap uncertainty on the average step (a cost file given: -)."""
    cal = run.get("calibration")
    return f"{cal['rel_uncertainty']:.1%}" if cal else "-"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, policy in enumerate(dict.fromkeys(r["policy"] for r in runs)):
        mine = sorted((r for r in runs if r["policy"] == policy), key=lambda r: r["rate"])
        rates = [r["rate"] for r in mine]
        color = f"C{i}"
        for ax, key, label in ((axes[0], "latency_mean_s", "mean latency (s)"),
                               (axes[1], "ttft_mean_s", "mean TTFT (s)")):
            ax.plot(rates, [r["live"][key] for r in mine], "o-", color=color, label=f"{policy} live")
            ax.plot(rates, [r["sim"][key] for r in mine], "x--", color=color, label=f"{policy} sim")
            ax.set_xlabel("arrival rate (req/s)")
            ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("fluidserve: live engine vs simulator (same arrivals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
