"""Budgets: ask for the outcome, not the ratio.

``convert(model, budget=ghostify.Budget(speedup=1.5), example_inputs=x)`` picks every layer's
form (the convolution, or a GhostModule at one of several ratios and cheap-kernel sizes) so that
the converted model meets the budget with the least loss: a measured speed-up here, or a
fraction of the original's MACs or parameters (fvcore's counts). ``plan_budget`` makes the plan
without changing the model.
"""

from .plan import BudgetPlan, Measurement
from .planner import plan_budget
from .target import Budget
from .verify import budget_plan

__all__ = ["Budget", "BudgetPlan", "Measurement", "budget_plan", "plan_budget"]
