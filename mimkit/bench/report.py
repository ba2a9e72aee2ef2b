"""``mimkit bench``'s result as a text table (printed) and as Markdown (for the README's performance section)."""
from typing import List


def _num(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _row_cells(r: dict, peers: List[str]) -> List[str]:
    """One result's cells, shared by the text and the Markdown table."""
    ips, peak = r["images_per_s"], r["memory"]["peak_mb"]
    return ([r["config"], r["precision"], r["impl"], str(r["batch"]),
             f"{_num(ips['median'])} [{_num(ips['min'])}-{_num(ips['max'])}]",
             f"{100 * r['cpu_share']['median']:.0f}%" if r.get("cpu_share") else ""]
            + [f"{r['vs'][p]:.2f}x" if p in r.get("vs", {}) else "" for p in peers]
            + [f"{r['flops_per_image'] / 1e9:.2f}", f"{r['achieved_flops'] / 1e9:.1f}",
               f"{100 * r['fraction_of_matmul']:.0f}%", _outside_matmul(r), "-" if peak is None else f"{peak:.0f}"])


def _outside_matmul(r: dict) -> str:
    """The share of the step outside matrix multiplications, and its largest part."""
    b = r.get("breakdown")
    if not b or not sum(b.values()):
        return ""
    total = sum(b.values())
    rest = {k: v for k, v in b.items() if k != "matmul"}
    top = max(rest, key=rest.get)
    return f"{100 * (total - b['matmul']) / total:.0f}% ({top} {100 * rest[top] / total:.0f}%)"


def format_table(result: dict) -> str:
    """The result as the text table ``mimkit bench`` prints."""
    m = result["machine"]
    lines = [f"mimkit bench: {m.get('gpu') or m['cpu']} ({m['cpu_cores']} cores, {m['threads']} threads), torch "
             f"{m['torch']}, timm {m['timm']}, transformers {m['transformers']}, lightly {m['lightly']}; "
             f"{result['date']}; load average {result['load_before']} -> {result.get('load_after')}"]
    lines.append("dense matmul: " + ", ".join(
        f"{p} {v['median'] / 1e9:.0f} GFLOP/s [{v['min'] / 1e9:.0f}-{v['max'] / 1e9:.0f}]"
        for p, v in result["matmul"].items()))
    peers = sorted({r["impl"] for r in result["results"] if not r["impl"].startswith("mimkit")})
    cols = ["config", "prec", "impl", "batch", "img/s median [min-max]", "cpu"] + [f"vs {p}" for p in peers] + [
        "GFLOP/img", "GFLOP/s", "of matmul", "not matmul (most)", "peak MB"]
    table = [_row_cells(r, peers) for r in result["results"]]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines += ["", fmt(cols), fmt(["-" * w for w in widths])] + [fmt(t) for t in table]
    lines.append("(cpu: the CPU time the process got over wall time x threads, a gauge of the machine's load; "
                 "vs PEER: mimkit's median images/s over the peer's at the same precision; not matmul: the step's "
                 "time outside matrix multiplications, by the profiler, and its largest category)")
    dp = result.get("data_pipeline")
    if dp:
        v = dp["images_per_s"]
        lines += ["", f"data pipeline ({dp['config']}, {dp['data']}, {dp['images']} images, batch {dp['batch']}, "
                      f"cached {dp['cached']}): {v['median']:.0f} img/s [{v['min']:.0f}-{v['max']:.0f}], "
                      f"setup {dp['setup_s']:.1f} s"]
    lc = result.get("loss_check")
    if lc:
        lines += ["", f"bf16 loss check ({lc['config']}, {lc['steps']} steps of {lc['batch']}): mean |bf16 - fp32| "
                      f"{lc['bf16_gap']:.4f} vs {lc['noise_gap']:.4f} between fp32 runs with other masks: "
                      f"{'pass' if lc['passed'] else 'FAIL'} (final window: " + ", ".join(
                          f"{k} {v:.4f}" for k, v in lc["final"].items()) + ")"]
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The result table as Markdown (for the README's performance section)."""
    m = result["machine"]
    peers = sorted({r["impl"] for r in result["results"] if not r["impl"].startswith("mimkit")})
    lines = [f"{m.get('gpu') or m['cpu']}, {m['cpu_cores']} cores, {m['threads']} threads; torch {m['torch']}, "
             f"timm {m['timm']}, transformers {m['transformers']}, lightly {m['lightly']}; {result['date']}; "
             f"load average {result['load_before'][0] if result['load_before'] else '?'} before, "
             f"{result['load_after'][0] if result.get('load_after') else '?'} after. Dense matmul measured in the "
             "run: " + ", ".join(f"{p} {v['median'] / 1e9:.0f} GFLOP/s" for p, v in result["matmul"].items()) + ".",
             "", "| config | precision | implementation | batch | images/s, median [min-max] | CPU share | "
             + " | ".join(f"mimkit / {p}" for p in peers) + " | GFLOP/image | GFLOP/s | of matmul rate | step outside matmuls (largest part) | peak MB |",
             "|" + " --- |" * (11 + len(peers))]
    lines += ["| " + " | ".join(_row_cells(r, peers)) + " |" for r in result["results"]]
    dp, lc = result.get("data_pipeline"), result.get("loss_check")
    if dp:
        v = dp["images_per_s"]
        lines += ["", f"Data pipeline alone ({dp['data']}, {dp['images']} images, batch {dp['batch']}, decoded once "
                      f"into memory: {dp['cached']}): {v['median']:.0f} images/s [{v['min']:.0f}-{v['max']:.0f}]."]
    if lc:
        lines += ["", f"bf16 loss check ({lc['config']}, {lc['steps']} steps of {lc['batch']} images): mean |bf16 - "
                      f"fp32| of {lc['window']}-step means {lc['bf16_gap']:.5f}, against {lc['noise_gap']:.5f} between "
                      f"two fp32 runs with different masks: {'pass' if lc['passed'] else 'fail'}."]
    return "\n".join(lines)
