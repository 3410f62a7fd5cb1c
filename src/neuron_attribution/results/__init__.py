"""Result types people keep: plain dataclasses with their JSON forms. No computation."""
