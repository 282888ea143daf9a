"""Learning a delay with the library alone (no pipeline): jax.jit + jax.value_and_grad + optax.

Data: 16 trajectories of the delayed negative feedback x'(t) = -a x(t - τ) with a = 1.2,
τ = 1.0, each from its own constant history x = c_i before 0 (continuous: x(0) = c_i),
observed at 24 times in (0, 8]. Model: x'(t) = -a x(t - τ) + g(x(t)) with a, τ and a small
tanh MLP g learned, τ started at 0.5 (half the true delay). The 16 trajectories are one
batched system (x has shape (16,)); the gradient uses the default InterpolatingAdjoint, and
the τ-gradient includes the breakpoints' motion with τ (DESIGN.md, The mathematics).
Run: python examples/learn_delay.py (about 25 s on two cores: τ 0.5 → 1.008 in 400 Adam steps).
"""

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import solvers as sv  # noqa: E402

TRUE = {"a": 1.2, "tau": 1.0}
C = jnp.linspace(-1.0, 1.0, 16)  # each trajectory's constant history
OBS = jnp.linspace(1.0 / 3.0, 8.0, 24)


def g(theta, x):
    (w1, b1), (w2, b2) = theta
    return (jnp.tanh(x[:, None] * w1 + b1) @ w2 + b2)[:, 0]


def rhs(t, x, lagged, p):
    return -p["a"] * lagged[0] + g(p["theta"], x)


problem = sv.DDEProblem(rhs, history=lambda t, p: C, delays=lambda p: jnp.stack([p["tau"]]), t0=0.0, t1=8.0)


def data():
    theta0 = [(jnp.zeros((1, 8)), jnp.zeros(8)), (jnp.zeros((8, 1)), jnp.zeros(1))]  # g = 0: the true system
    p = {"a": jnp.asarray(TRUE["a"]), "tau": jnp.asarray(TRUE["tau"]), "theta": theta0}
    return sv.solve(problem, p, saveat=OBS, rtol=1e-10, atol=1e-12).ys


def init(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    theta = [(0.3 * jax.random.normal(k1, (1, 8)), jnp.zeros(8)), (0.3 * jax.random.normal(k2, (8, 1)), jnp.zeros(1))]
    return {"a": jnp.asarray(0.8), "tau": jnp.asarray(0.5), "theta": theta}


def train(steps=400, learning_rate=2e-2):
    ys = data()
    loss = lambda p: jnp.mean((sv.solve(problem, p, saveat=OBS).ys - ys) ** 2)
    opt = optax.adam(learning_rate)

    @jax.jit
    def update(p, state):
        value, grad = jax.value_and_grad(loss)(p)
        updates, state = opt.update(grad, state, p)
        return optax.apply_updates(p, updates), state, value

    p = init()
    state = opt.init(p)
    for step in range(1, steps + 1):
        p, state, value = update(p, state)
        if step % 100 == 0 or step == 1:
            print(f"step {step:4d}  loss {float(value):.3e}  tau {float(p['tau']):.4f}  a {float(p['a']):.4f}")
    return p, float(loss(p))


def main():
    p, final = train()
    print(f"learned tau: {float(p['tau']):.4f} (true {TRUE['tau']}), a: {float(p['a']):.4f} (true {TRUE['a']})")
    print(f"final loss: {final:.3e}")


if __name__ == "__main__":
    main()
