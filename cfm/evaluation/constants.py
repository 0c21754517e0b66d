"""Constants that an evaluation and the report (results.py) both need, kept here so that results.py
reads them without importing the evaluations (they pull in POT and scikit-learn: seconds)."""

# The held-out locality terms compute_locality.py records (locality.evaluate's values), in the order
# they are reported.
LOCALITY_TERMS = ("local_loss", "anchor_loss_full", "anchor_loss_simple", "loss_fm")
# d_(1) < d_(2) / 3: memorized (Yoon et al. 2023; Gu et al. 2023).
MEMORIZATION_RATIO = 1 / 3
