"""Data utilities: readers for the seed formats and the phantom cohort generator (`trainers.data.phantom`)."""
