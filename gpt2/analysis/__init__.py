"""Analysis of finished runs: ablation summaries and the statistics behind them."""
