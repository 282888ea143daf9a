"""Write data.h5 for hutchinson.toml: trajectories of x' = r x (1 - x(t - tau) / K) with
r = 1.8, K = 1, tau = 1 and a constant history x0, in the layout a user's file has (ts (n,),
ys (N, n, d), x0 (N, d)).

Usage: python make_data.py [OUT.h5]   (default: data.h5 beside this file)
"""

import pathlib
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np

import solvers as sv

R, K, TAU = 1.8, 1.0, 1.0
N, T1, N_TIMES, SEED = 8, 4.0, 21, 0


def trajectories(x0, ts):
    """(N, n, 1) solutions from the constant histories x0 (N, 1), at tight tolerances."""
    prob = sv.DDEProblem(lambda t, x, lagged, p: R * x * (1 - lagged[0] / K), lambda t, p: p + 0.0 * t,
                         lambda p: jnp.array([TAU]), 0.0, ts[-1])
    one = lambda p: sv.solve(prob, p, saveat=ts, rtol=1e-10, atol=1e-12, max_steps=100_000).ys
    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(x0)))


def main(out):
    jax.config.update("jax_enable_x64", True)
    x0 = np.random.default_rng(SEED).uniform(0.1, 0.6, (N, 1))
    ts = np.linspace(0.0, T1, N_TIMES)
    with h5py.File(out, "w") as f:
        f["ts"], f["ys"], f["x0"] = ts, trajectories(x0, jnp.asarray(ts)), x0
    print(f"wrote {out}: {N} trajectories x {N_TIMES} times")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).with_name("data.h5"))
