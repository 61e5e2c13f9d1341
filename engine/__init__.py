"""The step protocol: plan a step, build its data and models, train it, evaluate and file the results."""
