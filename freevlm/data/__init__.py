"""Readers for public dataset formats, images, and the procedural shapes world of the demo."""
