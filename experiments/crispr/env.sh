# shared settings for the CRISPR experiments: one thread, low priority, no progress bars in logs
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TORCH_NUM_THREADS=1 BIASLAB_PROGRESS=0
