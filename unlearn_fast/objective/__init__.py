"""The unlearning objective and the baselines, in terms of ops."""
from .baselines import (LOSS_TYPES, TRAINS_ENCODER_ONLY, WEIGHTINGS, check_loss_type, check_weighting, max_loss,
                        noisy_label_loss, random_encoder_loss, random_encoder_target, retain_label_loss,
                        split_token_loss, tile_retain_rows)
from .unlearn_objective import UnlearnLoss, combine, unlearn_loss, unlearn_loss_merged_guide, unlearn_loss_pruned

__all__ = ["UnlearnLoss", "combine", "unlearn_loss", "unlearn_loss_merged_guide", "unlearn_loss_pruned", "LOSS_TYPES", "WEIGHTINGS",
           "TRAINS_ENCODER_ONLY", "check_loss_type", "check_weighting", "max_loss", "noisy_label_loss", "random_encoder_loss",
           "random_encoder_target", "retain_label_loss", "split_token_loss", "tile_retain_rows"]
