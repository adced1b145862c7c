"""Fitting after training: temperature, the decision rule, the not-a-lesion gate, ensembles and soups."""
