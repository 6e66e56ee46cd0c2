"""The container image, built and run (tests/deploy/test_image.py: `make test-image`)."""
