"""Extensions of the one training loop: what an architecture or pruning method adds."""
