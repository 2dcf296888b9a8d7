import socket, time, threading, os, sys
N=3000
s=socket.socket(); s.bind(("127.0.0.1",0)); s.listen()
c=socket.create_connection(s.getsockname()); d,_=s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,1)
def rx():
    os.sched_setaffinity(0,{1})
    n=0
    while n<N*60:
        n+=len(d.recv(100000))
t=threading.Thread(target=rx); t.start()
os.sched_setaffinity(0,{0})
gap=float(sys.argv[1])
cpu=0.0
for i in range(N):
    t0=time.thread_time(); c.send(b"x"*60); cpu+=time.thread_time()-t0
    if gap: time.sleep(gap)
t.join()
print(f"gap {gap*1e6:.0f} us: send CPU {cpu/N*1e6:.1f} us")
