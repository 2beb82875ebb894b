"""Exits leave exitspec: a trained exit written as a standard checkpoint other engines load."""
