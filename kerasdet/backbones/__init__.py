"""kerasdet.backbones"""
