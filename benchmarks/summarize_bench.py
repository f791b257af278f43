"""Print a table of pytest-benchmark JSON files: name, median, speedup vs reference, images/s, GB/s, memory.

    python benchmarks/summarize_bench.py bench_gpu.json [more.json ...]
"""
import json
import sys


def rows(path):
    with open(path) as fh:
        data = json.load(fh)
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        yield (b["name"], b["stats"]["median"] * 1e3, e.get("speedup_vs_reference"), e.get("images_per_s"),
               e.get("fused_GB_per_s"), e.get("peak_memory_mb"), e.get("device", ""))


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def main(paths):
    print(f"{'benchmark':58s} {'median ms':>10s} {'x ref':>7s} {'img/s':>9s} {'GB/s':>8s} {'peak MB':>9s}  device")
    for p in paths:
        try:
            for name, ms, sp, ips, gbs, mem, dev in rows(p):
                print(f"{name:58s} {ms:10.3f} {fmt(sp, '7.2f')} {fmt(ips, '9.1f')} {fmt(gbs, '8.1f')} "
                      f"{fmt(mem, '9.0f')}  {dev}")
        except (OSError, ValueError) as e:
            print(f"# {p}: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
