"""05_cost and `make report`: dated prices (prices), pure cost arithmetic (costs), the run's inputs (cost_inputs),
training / inference / local / what-if costs, the seeds' figures beside this run's (seeds_comparison), OpenAI's
service window, the figures (cost_plots), the summary 05 writes (cost_summary), and the report index (index)."""
