"""Method family beyond MAE: SimMIM and VideoMAE."""
