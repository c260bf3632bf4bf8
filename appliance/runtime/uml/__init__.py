"""runtime/uml"""
