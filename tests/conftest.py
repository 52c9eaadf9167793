import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# On a GPU node, cuDNN would run fp32 convolutions in TF32 by default: the fp32 tolerances (1e-5) assume exact fp32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
