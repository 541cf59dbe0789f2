"""Studies that drive many trainings and evaluate them: the paper's claims and the fine-tune conversion."""
