"""Reader feedback into the model: reports mapped onto a run's superpixels, retraining, and the
rescored run's diff (the loop the study needed two weeks for)."""
