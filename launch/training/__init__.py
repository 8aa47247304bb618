"""Training: set-up, the loop of steps and epochs, elastic training, the data, the models, evaluation,
learning-rate schedules and the guards of a step."""
