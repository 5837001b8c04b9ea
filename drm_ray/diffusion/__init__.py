"""Flow-matching math and denoising loops. Imports no Ray, DeepSpeed or MLflow."""
