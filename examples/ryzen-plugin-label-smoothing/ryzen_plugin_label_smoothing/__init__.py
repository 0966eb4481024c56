"""Example Ryzen plugin: label smoothing whose strength decays after each evaluation."""
