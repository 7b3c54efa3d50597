"""fastmerge.eval: judge a merge. Accuracy/loss of a model and of an ensemble, the loss along the
path between two models (with its barrier) and over the plane through three, feature pictures of
matched units, and PNG figures of all of it (fastmerge.eval.plots)."""

from .features import FeaturePictures, feature_pictures, maximise_unit
from .interpolation import Curve, Plane, barrier, interpolate, loss_plane
from .metrics import Metrics, accuracy, ensemble, ensemble_accuracy, evaluate

__all__ = ["Curve", "FeaturePictures", "Metrics", "Plane", "accuracy", "barrier", "ensemble", "ensemble_accuracy",
           "evaluate", "feature_pictures", "interpolate", "loss_plane", "maximise_unit"]
