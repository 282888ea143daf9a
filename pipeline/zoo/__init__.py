"""The shipped jobs' models, each a module with ``make_model(**options) -> pipeline.Model``,
reached like any user's model through ``[model] entry`` (``kind`` is a shorthand for
``pipeline.zoo.<kind>:make_model``). Their modules import with absolute names only: a run
imports its own copy of the entry file."""

SHIPPED = {"hnn": "pipeline.zoo.hnn:make_model", "ndde": "pipeline.zoo.ndde:make_model",
           "delayed_gradient": "pipeline.zoo.delayed_gradient:make_model"}
# The data system each shorthand's generated data comes from.
SYSTEM = {"hnn": "pendulum", "ndde": "mackey_glass", "delayed_gradient": "delayed_gradient"}
