"""dermsight: a skin-lesion image classifier. An aid for people and dermatologists, not a medical device."""

__version__ = "0.1.0"
