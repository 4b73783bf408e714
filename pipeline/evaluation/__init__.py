"""The Evaluator contract, the in-process evaluator, the cross-solver transfer table."""
