"""Recipes: complete uses of the library (the demo); the library itself never imports them."""
