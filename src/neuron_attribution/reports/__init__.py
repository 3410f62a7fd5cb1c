"""Presentation of results: the terminal (rich) and the HTML report with its figures."""
