"""Pixel statistics images are normalised with: the one home of the ImageNet mean and standard deviation."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
