"""Test and benchmark helpers shipped with polyrpc: an impairing UDP relay."""
