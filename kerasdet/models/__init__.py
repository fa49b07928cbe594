"""kerasdet.models"""
