"""05_cost and `make report`: dated prices, cost arithmetic, the cost report, and the report index."""
