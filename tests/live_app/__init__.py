"""A Flower app not written for gradleak (see ``app.py``); gradleak only wraps its strategy."""
