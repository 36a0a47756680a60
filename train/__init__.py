"""The IRIS self-play training harness (see train/README.md); entry point: train/selfplay.py."""
