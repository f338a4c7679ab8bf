"""Evaluation tasks scored inside the training loop; they know nothing of the trainer."""
