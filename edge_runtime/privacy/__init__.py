"""Privatization of what leaves the data owner: hidden states from its head stage, gradients from its tail."""
