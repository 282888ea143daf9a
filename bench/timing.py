"""Median wall time of a jitted callable (compilation excluded)."""

import statistics
import time

import jax


def median_time(fn, *args, repeats=7, warmup=1):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_times(fns, *args, rounds=15):
    """Per-round wall times of several jitted callables called in turn (round-robin), so that
    the machine's slow and fast periods fall on each of them alike. Returns {name: [times]};
    compare them by ``paired_ratio``."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t)
    return times


def paired_ratio(times, a, b):
    """Median over rounds of time[a] / time[b] (each pair measured back to back)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def versions():
    import importlib.metadata as md
    import platform

    names = ["jax", "equinox", "diffrax"]
    out = {n: md.version(n) for n in names if _installed(n)}
    out["python"] = platform.python_version()
    out["machine"] = f"{platform.machine()}, {__import__('os').cpu_count()} cores, {jax.devices()[0].device_kind}"
    return out


def _installed(name):
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def write_results(path, lines):
    """Print the report lines followed by the versions line, and write them to ``path``."""
    out = "\n".join(list(lines) + ["\n" + ", ".join(f"{k} {v}" for k, v in versions().items())]) + "\n"
    print(out)
    path.write_text(out)
