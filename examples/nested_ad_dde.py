"""The question in shared/seed/, answered: a neural DDE whose right-hand side is
g(f(x), f'(x)) for a network f, differentiated by every method, checked against finite
differences, plus a Hessian-vector product (second order through the solve).

    dx/dt = -f'(x(t - τ)) / (1 + f(x(t - τ))²) - 0.2 x(t),   history x(t) = h for t ≤ 0,

f a small tanh MLP R² → R; learnable: the network, τ, the history h and x(0) = x0 ≠ h.
Run: python examples/nested_ad_dde.py (about a minute and a half on two cores).
"""

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import solvers as sv  # noqa: E402


def f(theta, z):
    (w1, b1), (w2, b2) = theta
    return (jnp.tanh(z @ w1 + b1) @ w2 + b2)[0]


def rhs(t, x, lagged, p):
    y, dy = jax.value_and_grad(f, argnums=1)(p["theta"], lagged[0])  # f and f' of the network
    return -dy / (1.0 + y**2) - 0.2 * x


def init(seed=0, hidden=6):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    theta = [(jax.random.normal(k1, (2, hidden)) / 1.5, jnp.zeros(hidden)),
             (jax.random.normal(k2, (hidden, 1)) / 2.0, jnp.zeros(1))]
    return {"theta": theta, "tau": jnp.asarray(0.6), "h": jnp.array([0.5, -0.3]), "x0": jnp.array([1.0, 0.2])}


problem = sv.DDEProblem(rhs, history=lambda t, p: p["h"] * jnp.ones_like(t), delays=lambda p: jnp.stack([p["tau"]]),
                        t0=0.0, t1=4.0, x0=lambda p: p["x0"])
obs = jnp.linspace(0.5, 4.0, 8)
loss = lambda ys: jnp.sum(ys**2)


def main():
    p = init()
    print("x(T) =", sv.solve(problem, p, saveat=obs).ys[-1])
    # every DDE method (BacksolveAdjoint refuses DDEs) and central differences, float64
    cmp = sv.compare_sensitivities(problem, p, loss, saveat=obs)
    methods = [n for n in cmp.gradients if n != "finite differences"]
    print(f"worst relative difference between methods: {cmp.worst(exclude=('finite differences',)):.1e}")
    print(f"worst relative difference to finite differences: "
          f"{max(cmp.difference[m]['finite differences'] for m in methods):.1e}")

    # second order through the solve: a Hessian-vector product, forward over Backprop's reverse
    L = lambda p: loss(sv.solve(problem, p, saveat=obs, rtol=1e-10, atol=1e-12, sensitivity=sv.Backprop()).ys)
    v = jax.tree_util.tree_map(jnp.ones_like, p)
    grad_and_hvp = jax.jit(lambda p: jax.jvp(jax.grad(L), (p,), (v,)))  # (gradient, H v), compiled once
    hv = grad_and_hvp(p)[1]
    eps = 1e-5
    shifted = lambda s: grad_and_hvp(jax.tree_util.tree_map(lambda a, b: a + s * eps * b, p, v))[0]
    fd = jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * eps), shifted(1), shifted(-1))
    hv_flat, fd_flat = (jax.flatten_util.ravel_pytree(t)[0] for t in (hv, fd))
    print(f"Hessian-vector product vs differences of gradients: "
          f"{float(jnp.max(jnp.abs(hv_flat - fd_flat)) / jnp.max(jnp.abs(fd_flat))):.1e}")


if __name__ == "__main__":
    main()
